"""Where stages keep their outputs: artifacts/<stage>/ under the project root (DVC `outs`).

Downstream stages find upstream outputs here, never by importing the upstream stage.
"""

from __future__ import annotations

from pathlib import Path

ARTIFACTS = Path("artifacts")
MODEL_FILE = "model.pt"


def stage_dir(root: Path, stage: str) -> Path:
    """artifacts/<stage>/ of the project at `root`."""
    return root / ARTIFACTS / stage


def staging_dir(root: Path, stage: str) -> Path:
    """Where a running stage writes its outputs; the stage runner swaps it over stage_dir() after
    success, so a failed or killed run leaves the stored outputs as they were. What a killed run
    left here (its checkpoints) is what the next run resumes from."""
    return root / ARTIFACTS / f"{stage}.partial"


def model_path(root: Path, stage: str) -> Path:
    """The model file a training stage writes and downstream stages read."""
    return stage_dir(root, stage) / MODEL_FILE
