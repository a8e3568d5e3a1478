"""New scenes from a landing location: found by content, checked, ingested into the MS pool or quarantined.

The landing location (`landing.location`) is a local folder or any fsspec URL. Each entry directly
inside it is one scene (what `ms2rgb data ingest` takes): a 13-band GeoTIFF, a folder of per-band
files, a Sentinel-2 product as a `.SAFE` folder or a zip of one, a STAC item `.json`, or a folder
holding one STAC item and its assets. Bare band files get `data.radiometric_offset`; products their
own metadata's offset. One `poll` is one look at the location:

1. An entry whose size changed since the previous poll is still being written. It is taken once its
   size (and modification time, where the store has one) was the same on `landing.stable_polls`
   consecutive polls.
2. A settled entry is known by its content, never by its name: the sha256 of the file, or of each
   band file together with its band. Content seen before is not processed again, under any name.
3. New content is cut into tiles and cloud-scored (`cut_scene`, which checks the rasters) on params'
   `compute` runner: one scene after another in this process by default, side by side on its workers
   otherwise. Then, one scene at a time in the entries' order, `commit_scene` puts it in the pool and
   refuses it when all its tiles are there already (so side by side gives what one at a time gives),
   and its tiles get the validate stage's per-tile checks. A scene that fails moves to the
   quarantine with `<name>.reason.txt`; the other scenes go through.
4. A name that is not one plain file name (`../x`, `/abs/x`, control characters) is never used to
   build a path: the entry is left alone and a reason file in the quarantine records it.

Good scenes stay where they are (the location may be a shared drop); the ledger
(`data/.landing/ledger.json`, rewritten atomically after each scene) remembers their content. The
caller holds the project lock (flows/watch.py), so two polls never process one scene twice.
The ledger (flows/ledger.py) also follows each ingested scene until a retrain has trained on it
(flows/retrain.py); names and file systems are flows/locations.py's.

This is operations code: it uses the data layer but no stage imports it, so it lives beside the
flows, outside every stage's `dvc.yaml` deps, and editing it leaves every trained model fresh.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec
import pandas as pd
from rasterio.errors import RasterioError

from ms2rgb.flows.dvc_state import track_raw
from ms2rgb.flows.ledger import load_ledger, now, save_ledger, state_dir
from ms2rgb.flows.locations import (
    CHUNK,
    Location,
    UnsafeName,
    copy_tree,
    entry_name,
    move,
    name_problem,
    open_location,
    safe_child,
    write_text,
)
from ms2rgb.tasks.config import Params, ValidateConfig
from ms2rgb.tasks.data.sources.band_names import RASTER_SUFFIXES, band_from_filename
from ms2rgb.tasks.data.sources.radiometry import Radiometry, given_offset
from ms2rgb.tasks.data.sources.s2_product import scene_name
from ms2rgb.tasks.data.sources.scenes import CutScene, commit_scene, cut_scene
from ms2rgb.tasks.data.tile_stats import compute_tile_stats
from ms2rgb.tasks.errors import Ms2rgbError, SceneAlreadyInPool
from ms2rgb.tasks.training.parallel import run_all

Progress = Callable[[str], None]
_SCENE_ID_BAD = re.compile(r"[^A-Za-z0-9_.-]")
PRODUCT_SUFFIXES = (".zip", ".json")  # a zipped .SAFE product, a STAC item


# ---------------------------------------------------------------- one poll


@dataclass
class Outcome:
    """What one poll did with one landing entry."""

    name: str
    status: str  # ingested | quarantined | duplicate | known | settling | refused
    scene_id: str | None = None
    sha256: str | None = None
    reason: str | None = None
    tiles: int = 0


@dataclass
class PollResult:
    location: str
    outcomes: list[Outcome] = field(default_factory=list)

    def named(self, status: str) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == status]

    @property
    def ingested(self) -> list[str]:
        """Scene ids added to the pool by this poll."""
        return [str(o.scene_id) for o in self.named("ingested")]

    def as_dict(self) -> dict[str, Any]:
        return {"location": self.location, "outcomes": [asdict(o) for o in self.outcomes]}


@dataclass(frozen=True)
class _Entry:
    name: str
    path: str
    is_dir: bool
    signature: str
    problem: str | None  # why its name, or a name inside it, is refused


@dataclass(frozen=True)
class _Job:
    """A new scene this poll takes: planned here, cut on params' `compute` runner with the others
    (tiles and cloud scores, the slow part), then committed to the pool here, in the entries' order."""

    entry: _Entry
    sha: str
    scene_id: str
    source: Path  # a local path: the landing folder's entry, or its copy under `staging`
    staging: Path


@dataclass(frozen=True)
class _Deferred:
    """An entry with the content of an entry before it in this poll: decided once that one is done."""

    entry: _Entry
    sha: str


@dataclass
class _Poll:
    root: Path
    params: Params
    landing: Location
    quarantine: Location
    ledger: dict[str, Any]
    progress: Progress
    planned: set[str] = field(default_factory=set)  # contents (sha256) this poll takes
    reserved: set[str] = field(default_factory=set)  # scene ids given to them

    @property
    def scenes_dir(self) -> Path:
        return self.root / self.params.data.scenes_dir


def poll(root: Path, params: Params, progress: Progress = print) -> PollResult:
    """Look at the landing location once: ingest the settled new scenes, quarantine the bad ones."""
    root = root.resolve()
    cfg = params.landing
    landing = open_location(root, cfg.location, create="://" not in cfg.location)
    ctx = _Poll(root, params, landing, open_location(root, cfg.quarantine), load_ledger(root), progress)
    result = PollResult(cfg.location)
    entries = list(_list(landing))
    listed = {e.name for e in entries}
    for name in [n for n in ctx.ledger["seen"] if n not in listed]:  # gone (taken away or quarantined)
        del ctx.ledger["seen"][name]
    planned = []
    for entry in entries:
        planned.append(_one(ctx, entry))
        save_ledger(root, ctx.ledger)
    cuts = iter(_cut_all(ctx, [item for item in planned if isinstance(item, _Job)]))
    for item in planned:  # in the entries' order, as if each scene had been taken on its own
        if isinstance(item, _Job):
            item = _finish(ctx, item, next(cuts))
        elif isinstance(item, _Deferred):  # the entry of the same content before it is done now
            item = _decide(ctx, item.entry, item.sha)
            assert not isinstance(item, _Job), "every job's content is recorded once it is finished"
        result.outcomes.append(item)
        save_ledger(root, ctx.ledger)
    save_ledger(root, ctx.ledger)
    return result


def _list(location: Location) -> Iterator[_Entry]:
    try:
        listing = location.fs.ls(location.path, detail=True)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise Ms2rgbError(
            f"landing.location={location.url!r}: cannot be listed ({exc}). Fix: create it, or point "
            "landing.location in params.yaml at the folder or URL where scenes are dropped"
        ) from exc
    for info in sorted(listing, key=lambda i: str(i["name"])):
        name = entry_name(location.path, str(info["name"]))
        path, problem = str(info["name"]), name_problem(name)
        if name.startswith(".") and not problem:  # hidden: uploads in progress (`../x` is reported, not hidden)
            continue
        if info.get("type") != "directory":
            yield _Entry(name, path, False, _stamp(info), problem)
            continue
        # A folder changes whenever any file in it does: its signature covers every file's size and time.
        files = {} if problem else location.fs.find(path, detail=True)
        inner = {entry_name(path, f): meta for f, meta in files.items()}
        problem = problem or next(
            (f"holds {rel!r}: {p}" for rel in inner for part in rel.split("/") if (p := name_problem(part))), None
        )
        lines = sorted(f"{rel}={_stamp(meta)}" for rel, meta in inner.items())
        yield _Entry(name, path, True, hashlib.sha1("\n".join(lines).encode()).hexdigest(), problem)


def _stamp(info: dict[str, Any]) -> str:
    when = next((info[k] for k in ("mtime", "LastModified", "updated", "last_modified", "created") if k in info), "")
    return f"{info.get('size')}@{when}"


def _file_sha(fs: fsspec.AbstractFileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def content_sha(fs: fsspec.AbstractFileSystem, path: str, is_dir: bool) -> str:
    """The scene's identity: the file's sha256, or for a folder the sha256 of its band files' hashes
    keyed by band (file names play no part, so a renamed copy is the same scene)."""
    if not is_dir:
        return _file_sha(fs, path)
    files = sorted(fs.find(path))
    bands = [
        f"{band}:{_file_sha(fs, f)}"
        for f in files
        if PurePosixPath(f).suffix.lower() in RASTER_SUFFIXES and (band := band_from_filename(Path(f)))
    ]
    lines = bands or [f"{entry_name(path, f)}:{_file_sha(fs, f)}" for f in files]  # no bands: a bad scene
    return hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()


def _one(ctx: _Poll, entry: _Entry) -> Outcome | _Job | _Deferred:
    if entry.problem:
        return _refuse(ctx, entry.name, entry.problem)
    seen = ctx.ledger["seen"].get(entry.name)
    if seen is None or seen["signature"] != entry.signature:
        seen = {"signature": entry.signature, "polls": 0, "sha256": None}
    seen["polls"] += 1
    ctx.ledger["seen"][entry.name] = seen
    needed = ctx.params.landing.stable_polls
    if seen["polls"] < needed:
        ctx.progress(f"landing: {entry.name}: still settling (same size on {seen['polls']}/{needed} polls)")
        return Outcome(entry.name, "settling")
    if seen["sha256"] is None:
        seen["sha256"] = content_sha(ctx.landing.fs, entry.path, entry.is_dir)
    sha = str(seen["sha256"])
    return _Deferred(entry, sha) if sha in ctx.planned else _decide(ctx, entry, sha)


def _decide(ctx: _Poll, entry: _Entry, sha: str) -> Outcome | _Job:
    """What becomes of a settled entry: known content is skipped, quarantined or refused again; new
    content becomes a job."""
    known = ctx.ledger["scenes"].get(sha)
    if known is not None and known["status"] in ("ingested", "duplicate"):
        if entry.name not in known["names"]:
            known["names"].append(entry.name)
            ctx.progress(f"landing: {entry.name}: same content as {known['names'][0]} ({known['status']}): skipped")
        return Outcome(entry.name, "known", known.get("scene_id"), sha)
    if known is not None and known["status"] == "refused":
        return Outcome(entry.name, "refused", sha256=sha, reason=known["reason"])
    if known is not None:  # the same bad bytes dropped again
        first = known["names"][0]
        return _quarantine(ctx, entry, sha, f"same content as {first!r}, quarantined before: {known['reason']}")
    return _plan(ctx, entry, sha)


def _record(ctx: _Poll, entry: _Entry, sha: str, status: str, **info: Any) -> None:
    """Remember what became of this content (names it arrived under accumulate)."""
    names = ctx.ledger["scenes"].get(sha, {}).get("names", [])
    names = names + [entry.name] if entry.name not in names else names
    ctx.ledger["scenes"][sha] = {"status": status, "names": names, "at": now(), **info}


def _plan(ctx: _Poll, entry: _Entry, sha: str) -> Outcome | _Job:
    """A job for new content: a local copy of a remote entry, a scene id; or the outcome that it is
    refused (unsafe name) or quarantined (not a scene by its name)."""
    staging = state_dir(ctx.root) / "staging" / sha[:16]
    try:
        if ctx.landing.local is not None:
            source = safe_child(ctx.landing.local, entry.name)
        else:  # rasterio reads local files: copy the scene under the project first
            shutil.rmtree(staging, ignore_errors=True)
            source = staging / entry.name
            copy_tree(ctx.landing.fs, entry.path, fsspec.filesystem("file"), str(safe_child(staging, entry.name)))
        if not entry.is_dir and source.suffix.lower() not in RASTER_SUFFIXES + PRODUCT_SUFFIXES:
            shutil.rmtree(staging, ignore_errors=True)
            return _quarantine(
                ctx,
                entry,
                sha,
                f"not a scene: expected a 13-band GeoTIFF ({', '.join(RASTER_SUFFIXES)}), a zipped .SAFE product, "
                "a STAC item (.json) or a folder (per-band files, a .SAFE product, a STAC item with its assets)",
            )
    except UnsafeName as exc:
        shutil.rmtree(staging, ignore_errors=True)
        _record(ctx, entry, sha, "refused", scene_id=None, reason=str(exc))
        return _refuse(ctx, entry.name, str(exc))
    scene_id = _scene_id(ctx, entry, sha)
    ctx.planned.add(sha)
    ctx.reserved.add(scene_id)
    ctx.progress(f"landing: {entry.name}: new scene (sha256 {sha[:12]}), ingesting as {scene_id}")
    return _Job(entry, sha, scene_id, source, staging)


def _cut_all(ctx: _Poll, jobs: list[_Job]) -> list[CutScene | str]:
    """Every job's scene cut into tiles (or why it could not be), on params' `compute` runner: one after
    another in this process by default, side by side on its workers otherwise."""
    if not jobs:
        return []
    shared = {
        "scenes_dir": ctx.scenes_dir,
        "max_cloud_share": ctx.params.data.max_cloud_share,
        "radiometry": given_offset(ctx.params.data.radiometric_offset, "param", "data.radiometric_offset"),
        # a worker process prints (Prefect keeps its logs); this process's progress may not pickle
        "progress": ctx.progress if ctx.params.compute.workers == 1 else print,
    }
    calls = [{"source": job.source, "scene_id": job.scene_id} | shared for job in jobs]
    return run_all(cut_landed, calls, [f"cut {job.entry.name}" for job in jobs], ctx.params.compute)


def cut_landed(
    source: Path, scenes_dir: Path, scene_id: str, max_cloud_share: float, radiometry: Radiometry, progress: Progress
) -> CutScene | str:
    """One landed scene cut into tiles beside the pool, or the reason it is not a good scene."""
    try:
        return cut_scene(
            [source],
            scenes_dir,
            scene_id=scene_id,
            progress=progress,
            max_cloud_share=max_cloud_share,
            radiometry=radiometry,
        )
    except (Ms2rgbError, RasterioError) as exc:
        return str(exc)


def _finish(ctx: _Poll, job: _Job, cut: CutScene | str) -> Outcome:
    """Commit a cut scene to the pool and check its tiles, or quarantine it; the outcome recorded."""
    entry, sha, scene_id = job.entry, job.sha, job.scene_id
    try:
        if isinstance(cut, str):
            return _quarantine(ctx, entry, sha, cut)
        try:
            frame = commit_scene(cut, ctx.scenes_dir, ctx.progress)
        except SceneAlreadyInPool as exc:  # not a fault of the file: recorded, never quarantined
            _record(ctx, entry, sha, "duplicate", scene_id=None, reason=str(exc))
            ctx.progress(f"landing: {entry.name}: {exc}")
            return Outcome(entry.name, "duplicate", None, sha, str(exc))
        except (Ms2rgbError, RasterioError) as exc:
            return _quarantine(ctx, entry, sha, str(exc))
        problems = tile_problems(frame, ctx.scenes_dir, ctx.params.validation)
        if problems:
            shutil.rmtree(ctx.scenes_dir / scene_id, ignore_errors=True)
            return _quarantine(ctx, entry, sha, "its tiles fail the validate stage's checks: " + "; ".join(problems))
    finally:
        shutil.rmtree(job.staging, ignore_errors=True)
    track_raw(ctx.root, ctx.scenes_dir / scene_id)  # pushed and pulled with the project (flows/dvc_state.py)
    info = {"scene_id": scene_id, "tiles": len(frame), "reason": None, "ingested_s": time.time()}
    _record(ctx, entry, sha, "ingested", retrain={"status": "pending", "attempts": 0}, **info)
    ctx.progress(f"landing: {entry.name}: {len(frame)} tiles joined the MS pool as {scene_id}")
    return Outcome(entry.name, "ingested", scene_id, sha, None, len(frame))


def _scene_id(ctx: _Poll, entry: _Entry, sha: str) -> str:
    """A folder name under data/scenes from the entry's name; made unique rather than replacing a scene."""
    stem = scene_name(entry.name if entry.is_dir else PurePosixPath(entry.name).stem)  # x.SAFE.zip -> x
    base = _SCENE_ID_BAD.sub("_", stem).strip("._-") or "scene"
    taken = {s.get("scene_id") for s in ctx.ledger["scenes"].values()} | ctx.reserved
    for candidate in (base, f"{base}-{sha[:8]}", f"{base}-{sha[:16]}"):
        if candidate not in taken and not (ctx.scenes_dir / candidate).exists():
            return candidate
    return f"{base}-{sha}"


def tile_problems(frame: pd.DataFrame, scenes_dir: Path, cfg: ValidateConfig, listed: int = 3) -> list[str]:
    """The validate stage's per-tile checks on a just-ingested scene, as readable lines (empty: all pass)."""
    stats = compute_tile_stats(frame, scenes_dir, progress=lambda _: None).reset_index(drop=True)
    ids = frame["id"].reset_index(drop=True)
    nodata, peak = stats["nodata_share"].fillna(1.0), stats["max_value"].fillna(0.0)
    checks = {
        "cannot be read": ~stats["readable"],
        "do not hold 13 bands": stats["band_count"].fillna(-1) != 13,
        "are not uint16": stats["dtype"].fillna("") != "uint16",
        "hold NaN pixels": stats["nan_share"].fillna(1.0) > 0,
        f"have a no-data share above validate.max_nodata_share={cfg.max_nodata_share}": nodata > cfg.max_nodata_share,
        f"exceed validate.ms_value_max={cfg.ms_value_max}": peak > cfg.ms_value_max,
        f"have a saturated share above validate.max_saturated_share={cfg.max_saturated_share}": (
            stats["saturated_share"].fillna(1.0) > cfg.max_saturated_share
        ),
        "are all zero": peak < 1,
        "have no CRS": ~stats["has_crs"].fillna(False).astype(bool),
    }
    out = []
    for what, bad in checks.items():
        bad = bad.fillna(True).astype(bool)
        if bad.any():
            examples = ", ".join(ids[bad].head(listed))
            out.append(f"{int(bad.sum())} of {len(frame)} tiles {what} (e.g. {examples})")
    return out


# ---------------------------------------------------------------- quarantine and refusals


def _free_name(location: Location, name: str, sha: str) -> str:
    """`name` if the quarantine does not hold it yet, else the name with the content hash added."""
    if not location.exists(name) and not location.exists(f"{name}.reason.txt"):
        return name
    path = PurePosixPath(name)
    for n in range(100):
        tag = sha[:8] if n == 0 else f"{sha[:8]}-{n}"
        candidate = f"{path.stem}-{tag}{path.suffix}"
        if not location.exists(candidate) and not location.exists(f"{candidate}.reason.txt"):
            return candidate
    raise Ms2rgbError(f"{location.url}: no free name for {name!r} in the quarantine; empty it")


def _quarantine(ctx: _Poll, entry: _Entry, sha: str, reason: str) -> Outcome:
    """Move the entry into the quarantine beside a reason file, and remember its content as bad."""
    quarantine = ctx.quarantine
    if quarantine.local is not None:
        quarantine.local.mkdir(parents=True, exist_ok=True)
    else:
        quarantine.fs.makedirs(quarantine.path, exist_ok=True)
    dest = _free_name(quarantine, entry.name, sha)
    write_text(
        quarantine,
        f"{dest}.reason.txt",
        f"scene:   {entry.name}\nfrom:    {ctx.landing.url.rstrip('/')}/{entry.name}\nsha256:  {sha}\n"
        f"when:    {now()}\nreason:  {reason}\n"
        "fix:     repair or re-export the scene and drop it into the landing location again "
        "(changed bytes are a new scene; the same bytes are quarantined again)\n",
    )
    move(ctx.landing, entry.name, quarantine, dest, entry.is_dir)
    _record(ctx, entry, sha, "quarantined", scene_id=None, reason=reason, quarantined_as=dest)
    ctx.ledger["seen"].pop(entry.name, None)
    ctx.progress(f"landing: {entry.name}: quarantined as {quarantine.url.rstrip('/')}/{dest}: {reason}")
    return Outcome(entry.name, "quarantined", None, sha, reason)


def _refuse(ctx: _Poll, name: str, problem: str) -> Outcome:
    """Leave an entry with an unsafe name alone; say so once, in a reason file with a name of our own."""
    key = repr(name)
    if key not in ctx.ledger["refused"]:
        tag = hashlib.sha1(name.encode(errors="surrogateescape")).hexdigest()[:12]
        ctx.quarantine.fs.makedirs(ctx.quarantine.path, exist_ok=True)
        write_text(
            ctx.quarantine,
            f"refused-{tag}.reason.txt",
            f"entry:   {name!r}\nfrom:    {ctx.landing.url}\nwhen:    {now()}\nreason:  {problem}\n"
            "fix:     rename it to a plain file name inside the landing location; it was neither read nor moved\n",
        )
        ctx.ledger["refused"][key] = now()
        ctx.progress(f"landing: {name!r}: refused: {problem}")
    return Outcome(name, "refused", reason=problem)
