"""New scenes from a landing location: found by content, checked, ingested into the MS pool or quarantined.

The landing location (`landing.location`) is a local folder or any fsspec URL. Each entry directly
inside it is one scene: a 13-band GeoTIFF, or a folder of per-band files (what `ms2rgb data ingest`
takes). One `poll` is one look at the location:

1. An entry whose size changed since the previous poll is still being written. It is taken once its
   size (and modification time, where the store has one) was the same on `landing.stable_polls`
   consecutive polls.
2. A settled entry is known by its content, never by its name: the sha256 of the file, or of each
   band file together with its band. Content seen before is not processed again, under any name.
3. New content goes through `ingest_scene`, which checks the rasters and refuses a scene whose tiles
   are all in the pool already; then its tiles get the validate stage's per-tile checks. A scene
   that fails moves to the quarantine with `<name>.reason.txt`; the other scenes go through.
4. A name that is not one plain file name (`../x`, `/abs/x`, control characters) is never used to
   build a path: the entry is left alone and a reason file in the quarantine records it.

Good scenes stay where they are (the location may be a shared drop); the ledger
(`data/.landing/ledger.json`, rewritten atomically after each scene) remembers their content. The
caller holds the project lock (flows/watch.py), so two polls never process one scene twice.
The ledger also follows each ingested scene until a retrain has trained on it (flows/retrain.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec
import pandas as pd
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from rasterio.errors import RasterioError

from ms2rgb.tasks.config import Params, ValidateConfig
from ms2rgb.tasks.data.atomic import write_json_atomic, write_text_atomic
from ms2rgb.tasks.data.sources.scenes import RASTER_SUFFIXES, band_from_filename, ingest_scene
from ms2rgb.tasks.data.tile_stats import compute_tile_stats
from ms2rgb.tasks.errors import Ms2rgbError, SceneAlreadyInPool

Progress = Callable[[str], None]
STATE_DIR = Path("data") / ".landing"  # ledger and staging copies of remote scenes, under the project
LEDGER_NAME = "ledger.json"
MAX_RETRAIN_ATTEMPTS = 3  # a scene whose retrain was killed this often is no longer re-announced
LOST_EVENT_S = 600.0  # a scene announced this long ago that no retrain has taken yet is announced again
_CHUNK = 1 << 20
_SCENE_ID_BAD = re.compile(r"[^A-Za-z0-9_.-]")


class UnsafeName(Ms2rgbError):
    """A landing entry's name would address something outside the folder it is listed in."""


# ---------------------------------------------------------------- names and locations


def name_problem(name: str) -> str | None:
    """Why `name` is not one plain file name (None when it is): it must not climb, be absolute or nest."""
    if not name:
        return "the name is empty"
    if any(ord(c) < 32 or c == "\x7f" for c in name):
        return "the name holds control characters"
    if name in (".", ".."):
        return "the name refers to a folder, not an entry in it"
    if "/" in name or "\\" in name or os.path.isabs(name) or re.match(r"^[A-Za-z]:", name):
        return "the name is a path (absolute, or with folder parts such as ../), not a plain file name"
    if len(name.encode()) > 255:
        return "the name is longer than 255 bytes"
    return None


def safe_child(base: Path, name: str) -> Path:
    """`base / name`, refusing any name that would land anywhere but directly inside `base`."""
    problem = name_problem(name)
    if problem:
        raise UnsafeName(f"{name!r}: {problem}; refused, nothing is written for it")
    child = base / name
    if child.resolve().parent != base.resolve():  # a symlinked parent or anything else that escapes
        raise UnsafeName(f"{name!r}: resolves outside {base}; refused, nothing is written for it")
    return child


@dataclass(frozen=True)
class Location:
    """A folder of a local or fsspec file system."""

    fs: fsspec.AbstractFileSystem
    path: str  # in the file system's own terms, without a trailing slash
    url: str  # as configured, for messages

    @property
    def local(self) -> Path | None:
        return Path(self.path) if isinstance(self.fs, LocalFileSystem) else None

    def child(self, name: str) -> str:
        if self.local is not None:
            return str(safe_child(self.local, name))
        problem = name_problem(name)
        if problem:
            raise UnsafeName(f"{name!r}: {problem}; refused, nothing is written for it")
        return f"{self.path}/{name}"

    def exists(self, name: str) -> bool:
        return bool(self.fs.exists(self.child(name)))


def open_location(root: Path, spec: str, create: bool = False) -> Location:
    """A configured location: an fsspec URL (anything with ://) or a folder, relative ones from `root`."""
    if "://" in spec:
        fs, path = url_to_fs(spec)
    else:
        folder = Path(spec).expanduser()
        fs, path = fsspec.filesystem("file"), str((folder if folder.is_absolute() else root / folder).resolve())
    location = Location(fs, path.rstrip("/") or "/", spec)
    if create:
        fs.makedirs(location.path, exist_ok=True)
    return location


def entry_name(base: str, path: str) -> str:
    """The name of a listed entry relative to the listed folder. A listing that returns something not
    directly inside it (a store key such as `drop/../x`, an absolute path) keeps its odd name, which
    name_problem then refuses."""
    prefix = base.rstrip("/") + "/"
    path = path.rstrip("/")
    return path[len(prefix) :] if path.startswith(prefix) else path


# ---------------------------------------------------------------- the ledger


def state_dir(root: Path) -> Path:
    return root / STATE_DIR


def load_ledger(root: Path) -> dict[str, Any]:
    path = state_dir(root) / LEDGER_NAME
    ledger: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    for key in ("seen", "scenes", "refused"):
        ledger.setdefault(key, {})
    return ledger


def save_ledger(root: Path, ledger: dict[str, Any]) -> None:
    write_json_atomic(state_dir(root) / LEDGER_NAME, ledger)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


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


@dataclass
class _Poll:
    root: Path
    params: Params
    landing: Location
    quarantine: Location
    ledger: dict[str, Any]
    progress: Progress

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
    for entry in entries:
        result.outcomes.append(_one(ctx, entry))
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
        while chunk := fh.read(_CHUNK):
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


def _one(ctx: _Poll, entry: _Entry) -> Outcome:
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
    return _take(ctx, entry, sha)


def _record(ctx: _Poll, entry: _Entry, sha: str, status: str, **info: Any) -> None:
    """Remember what became of this content (names it arrived under accumulate)."""
    names = ctx.ledger["scenes"].get(sha, {}).get("names", [])
    names = names + [entry.name] if entry.name not in names else names
    ctx.ledger["scenes"][sha] = {"status": status, "names": names, "at": _now(), **info}


def _take(ctx: _Poll, entry: _Entry, sha: str) -> Outcome:
    """Check and ingest one new scene; quarantine it when it fails."""
    staging = state_dir(ctx.root) / "staging" / sha[:16]
    try:
        if ctx.landing.local is not None:
            source = safe_child(ctx.landing.local, entry.name)
        else:  # rasterio reads local files: copy the scene under the project first
            shutil.rmtree(staging, ignore_errors=True)
            source = staging / entry.name
            copy_tree(ctx.landing.fs, entry.path, fsspec.filesystem("file"), str(safe_child(staging, entry.name)))
        if not entry.is_dir and source.suffix.lower() not in RASTER_SUFFIXES:
            return _quarantine(
                ctx,
                entry,
                sha,
                f"not a scene: expected a 13-band GeoTIFF ({', '.join(RASTER_SUFFIXES)}) or a folder of per-band files",
            )
        scene_id = _scene_id(ctx, entry, sha)
        ctx.progress(f"landing: {entry.name}: new scene (sha256 {sha[:12]}), ingesting as {scene_id}")
        try:
            frame = ingest_scene(
                [source],
                ctx.scenes_dir,
                scene_id=scene_id,
                progress=ctx.progress,
                max_cloud_share=ctx.params.data.max_cloud_share,
            )
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
    except UnsafeName as exc:
        _record(ctx, entry, sha, "refused", scene_id=None, reason=str(exc))
        return _refuse(ctx, entry.name, str(exc))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    info = {"scene_id": scene_id, "tiles": len(frame), "reason": None, "ingested_s": time.time()}
    _record(ctx, entry, sha, "ingested", retrain={"status": "pending", "attempts": 0}, **info)
    ctx.progress(f"landing: {entry.name}: {len(frame)} tiles joined the MS pool as {scene_id}")
    return Outcome(entry.name, "ingested", scene_id, sha, None, len(frame))


def _scene_id(ctx: _Poll, entry: _Entry, sha: str) -> str:
    """A folder name under data/scenes from the entry's name; made unique rather than replacing a scene."""
    stem = entry.name if entry.is_dir else PurePosixPath(entry.name).stem
    base = _SCENE_ID_BAD.sub("_", stem).strip("._-") or "scene"
    taken = {s.get("scene_id") for s in ctx.ledger["scenes"].values()}
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


def _write_text(location: Location, name: str, text: str) -> None:
    if location.local is not None:
        write_text_atomic(safe_child(location.local, name), text)
    else:
        location.fs.pipe(location.child(name), text.encode())


def _quarantine(ctx: _Poll, entry: _Entry, sha: str, reason: str) -> Outcome:
    """Move the entry into the quarantine beside a reason file, and remember its content as bad."""
    quarantine = ctx.quarantine
    if quarantine.local is not None:
        quarantine.local.mkdir(parents=True, exist_ok=True)
    else:
        quarantine.fs.makedirs(quarantine.path, exist_ok=True)
    dest = _free_name(quarantine, entry.name, sha)
    _write_text(
        quarantine,
        f"{dest}.reason.txt",
        f"scene:   {entry.name}\nfrom:    {ctx.landing.url.rstrip('/')}/{entry.name}\nsha256:  {sha}\n"
        f"when:    {_now()}\nreason:  {reason}\n"
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
        _write_text(
            ctx.quarantine,
            f"refused-{tag}.reason.txt",
            f"entry:   {name!r}\nfrom:    {ctx.landing.url}\nwhen:    {_now()}\nreason:  {problem}\n"
            "fix:     rename it to a plain file name inside the landing location; it was neither read nor moved\n",
        )
        ctx.ledger["refused"][key] = _now()
        ctx.progress(f"landing: {name!r}: refused: {problem}")
    return Outcome(name, "refused", reason=problem)


def copy_tree(src_fs: fsspec.AbstractFileSystem, src: str, dst_fs: fsspec.AbstractFileSystem, dst: str) -> None:
    """Copy a file or a folder between file systems; every nested name must be a plain name."""
    if not src_fs.isdir(src):
        dst_fs.makedirs(str(PurePosixPath(dst).parent), exist_ok=True)
        with src_fs.open(src, "rb") as fin, dst_fs.open(dst, "wb") as fout:
            shutil.copyfileobj(fin, fout, _CHUNK)
        return
    for path in sorted(src_fs.find(src)):
        rel = entry_name(src, path)
        for part in rel.split("/"):
            problem = name_problem(part)
            if problem:
                raise UnsafeName(f"{src}: nested entry {rel!r}: {problem}; refused, nothing is written for it")
        copy_tree(src_fs, path, dst_fs, f"{dst}/{rel}")


def move(src: Location, name: str, dst: Location, dest_name: str, is_dir: bool) -> None:
    """Move one entry between (possibly different) file systems."""
    if src.local is not None and dst.local is not None:
        shutil.move(safe_child(src.local, name), safe_child(dst.local, dest_name))
        return
    source, target = src.child(name), dst.child(dest_name)
    if src.fs is dst.fs:
        src.fs.mv(source, target, recursive=is_dir)
        return
    copy_tree(src.fs, source, dst.fs, target)
    src.fs.rm(source, recursive=is_dir)


# ---------------------------------------------------------------- retrain bookkeeping


def _untrained(ledger: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in ledger["scenes"].values() if s["status"] == "ingested" and s["retrain"]["status"] != "trained"]


def awaiting_retrain(root: Path) -> list[str]:
    """What `watch` announces again when no retrain is queued: scenes a killed retrain left `running`,
    and scenes still `pending` LOST_EVENT_S after they were announced (the event went unheard), as
    long as MAX_RETRAIN_ATTEMPTS retrains have not been killed on them."""
    now = time.time()
    return [
        str(s["scene_id"])
        for s in _untrained(load_ledger(root))
        if s["retrain"]["attempts"] < MAX_RETRAIN_ATTEMPTS
        and (
            s["retrain"]["status"] == "running"
            or (s["retrain"]["status"] == "pending" and now - s.get("ingested_s", 0.0) > LOST_EVENT_S)
        )
    ]


def start_retrain(root: Path, run_id: str | None) -> list[str]:
    """Mark every ingested, untrained scene as taken by this retrain (DVC retrains on all of them)."""
    ledger = load_ledger(root)
    scenes = _untrained(ledger)
    for scene in scenes:
        scene["retrain"].update(status="running", run_id=run_id, started=_now())
        scene["retrain"]["attempts"] += 1
    save_ledger(root, ledger)
    return [str(s["scene_id"]) for s in scenes]


def finish_retrain(root: Path, scene_ids: list[str], status: str, **info: Any) -> None:
    """Record how the retrain that took `scene_ids` ended (`trained` or `failed`, with details)."""
    ledger = load_ledger(root)
    for scene in ledger["scenes"].values():
        if scene.get("scene_id") in scene_ids and scene["status"] == "ingested":
            scene["retrain"].update(status=status, finished=_now(), **info)
    save_ledger(root, ledger)
