"""DVC is the one source of truth for "what is stale".

`dvc repro` decides by dvc.lock; the Prefect flow asks DVC the same question before each
stage and records a finished stage with `dvc commit`, so after a Prefect run `dvc status`
is clean and after `dvc repro` the flow skips the fresh stages.
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
