"""DVC is the one source of truth for "what is stale", and the versioner of the raw data users bring.

`dvc repro` decides by dvc.lock; the Prefect flow asks DVC the same question before each
stage and records a finished stage with `dvc commit`, so after a Prefect run `dvc status`
is clean and after `dvc repro` the flow skips the fresh stages.

The scenes `ms2rgb data ingest` and the landing watch add to the pool, and the tiles `ms2rgb data
masks` imports, are inputs no stage can rebuild: `track_raw` puts each under DVC (`dvc add`, one
`.dvc` file per scene folder and one for `data/masks/imported`), so that `dvc push` carries them and
a clone's `git pull` + `dvc pull` + `dvc repro` rebuilds the same prepared data.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def is_dvc_repo(root: Path) -> bool:
    return (root / ".dvc").is_dir() and (root / "dvc.yaml").exists()


@contextlib.contextmanager
def _repo(root: Path):
    # DVC resolves stage names and paths against the working directory, not the Repo root,
    # so work from inside the project for the duration of the call.
    from dvc.repo import Repo

    with contextlib.chdir(root), Repo(".") as repo:
        yield repo


def is_stale(root: Path, stage: str) -> bool:
    """True when DVC would re-run `stage` (changed deps/params/outs or never run)."""
    if not is_dvc_repo(root):
        return True  # outside a DVC repo nothing can be known fresh
    with _repo(root) as repo:
        return bool(repo.status(targets=[stage]))


def record(root: Path, stage: str) -> None:
    """Write the stage's current deps/params/outs hashes into dvc.lock and cache its outputs."""
    if not is_dvc_repo(root):
        log.warning("%s is not a DVC repo (no .dvc/ or dvc.yaml): stage %s ran but is not recorded", root, stage)
        return
    with _repo(root) as repo:
        repo.commit(stage, force=True)


def track_raw(root: Path, folder: Path) -> Path | None:
    """`dvc add` a folder of raw data a user command wrote under the project; its `.dvc` file, which
    belongs in git. None, and nothing done, outside a DVC repo or for a folder outside the project."""
    root, folder = root.resolve(), folder.resolve()
    if not is_dvc_repo(root) or not folder.is_relative_to(root):
        return None
    with _repo(root) as repo:
        repo.add([folder.relative_to(root).as_posix()])
    return folder.with_name(folder.name + ".dvc")
