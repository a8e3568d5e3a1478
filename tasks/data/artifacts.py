"""Where stages keep their outputs: artifacts/<stage>/ under the project root (DVC `outs`).

Downstream stages find upstream outputs here, never by importing the upstream stage.
"""

from __future__ import annotations

import shutil
from pathlib import Path

ARTIFACTS = Path("artifacts")
MODEL_FILE = "model.pt"
RUN_IDENTITY_FILE = "run-identity.txt"  # names the run a staging folder belongs to
# The --model value of `ms2rgb detect` / `predict` that asks for the stage's model file under artifacts/.
# Here, not in tasks/tracking/, so that checking for it imports no MLflow (about 2 s of start-up).
LOCAL_MODEL = "artifacts"


def stage_dir(root: Path, stage: str) -> Path:
    """artifacts/<stage>/ of the project at `root`."""
    return root / ARTIFACTS / stage


def staging_dir(root: Path, stage: str) -> Path:
    """Where a running stage writes its outputs; the stage runner swaps it over stage_dir() after
    success, so a failed or killed run leaves the stored outputs as they were. What a killed run
    left here (its checkpoints) is what the next run resumes from."""
    return root / ARTIFACTS / f"{stage}.partial"


def resumable_staging_dir(root: Path, stage: str, identity: str) -> Path:
    """staging_dir(), kept as a killed run of the same `identity` (params, data, seed) left it, so
    its checkpoints resume; emptied when another run left it, whose checkpoints would not fit."""
    out = staging_dir(root, stage)
    stamp = out / RUN_IDENTITY_FILE
    if not (stamp.is_file() and stamp.read_text() == identity):
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        stamp.write_text(identity)
    return out


def model_path(root: Path, stage: str) -> Path:
    """The model file a training stage writes and downstream stages read."""
    return stage_dir(root, stage) / MODEL_FILE
