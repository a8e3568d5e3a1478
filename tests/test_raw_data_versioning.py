"""Raw data is versioned: a scene `ms2rgb data ingest` adds and the tiles `ms2rgb data masks` imports are
DVC-tracked by the commands themselves, so a second clone with `git clone` + `dvc pull` + `dvc repro`
rebuilds exactly the same prepared data, scenes included (real git and DVC repos, a local remote)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import DVC, REPO, make_project, run_checked
from dvc.repo import Repo
from helpers_data import meadow
from helpers_rasters import write_raster

from ms2rgb.flows.cli import main as cli_main

SAMPLE = REPO / "tests" / "data" / "aerial_sample"
SCENE = "meadow"


def git(root: Path, *args: str) -> str:
    return run_checked(["git", *args], root).stdout


def dvc(root: Path, *args: str) -> str:
    return run_checked([str(DVC), *args], root).stdout


def git_ignores(root: Path, rel: str) -> bool:
    return subprocess.run(["git", "check-ignore", "-q", rel], cwd=root).returncode == 0


def data_outs(root: Path, stage: str) -> list[dict]:
    """The stage's data outputs in dvc.lock (its report holds run times, which differ between runs)."""
    outs = yaml.safe_load((root / "dvc.lock").read_text())["stages"][stage]["outs"]
    return [out for out in outs if out["path"].startswith("data/")]


@pytest.fixture
def origin(tmp_path: Path) -> Path:
    """A project as a clone has it (its .gitignore too), with a scene ingested and masks imported."""
    root = make_project(tmp_path / "origin")
    shutil.copy(REPO / ".gitignore", root / ".gitignore")
    scene = write_raster(tmp_path / f"{SCENE}.tif", meadow(3, 128, 128))
    cli_main(["--root", str(root), "data", "ingest", str(scene), "--scene-id", SCENE])
    images = ["--images", str(SAMPLE / "images"), "--masks", str(SAMPLE / "masks")]
    cli_main(["--root", str(root), "data", "masks", *images, "--legend", str(SAMPLE / "legend.yaml")])
    return root


def test_the_commands_leave_dvc_files_that_git_keeps(origin: Path) -> None:
    for rel in (f"data/scenes/{SCENE}.dvc", "data/masks/imported.dvc"):
        assert (origin / rel).is_file(), rel
        assert not git_ignores(origin, rel), f"{rel} is git-ignored: a clone would not see it"
    for rel in (f"data/scenes/{SCENE}", "data/masks/imported"):
        assert git_ignores(origin, rel), f"{rel} must stay out of git: DVC versions it"
    with Repo(origin) as repo:  # what a plain `dvc push` / `dvc pull` walks: git-ignored folders are skipped
        assert {f"data/scenes/{SCENE}.dvc", "data/masks/imported.dvc"} <= {
            Path(s.path).relative_to(origin).as_posix() for s in repo.index.stages
        }
    assert (
        dvc(origin, "status", f"data/scenes/{SCENE}.dvc", "data/masks/imported.dvc")
        .strip()
        .startswith("Data and pipelines are up to date")
    )


@pytest.mark.slow
def test_a_clone_pulls_the_raw_data_and_rebuilds_the_same_prepared_data(origin: Path, tmp_path: Path) -> None:
    dvc(origin, "repro", "prepare")
    git(origin, "add", "-A")
    git(origin, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "scene and masks")
    dvc(origin, "push")

    clone = tmp_path / "clone"
    run_checked(["git", "clone", "-q", str(origin), str(clone)], tmp_path)
    assert not (clone / "data" / "scenes" / SCENE).exists()  # git carries the .dvc files only
    dvc(clone, "remote", "modify", "--local", "local", "url", str(origin / ".dvc-storage"))
    dvc(clone, "pull", f"data/scenes/{SCENE}.dvc", "data/masks/imported.dvc")
    assert (clone / "data" / "scenes" / SCENE / "manifest.parquet").is_file()
    dvc(clone, "repro", "prepare")  # nothing of data/prepared was pulled: prepare runs again
    assert len(data_outs(origin, "prepare")) == 3  # raw, segmentation, prepared
    assert data_outs(clone, "prepare") == data_outs(origin, "prepare")
