"""Model artifacts on disk: what a stage writes to artifacts/<stage>/model.pt and downstream stages load.

Downstream stages read upstream models from these files (DVC deps), never from MLflow, so a
pipeline run needs no tracking server to be reproducible.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal, overload

import torch
from torch import nn

from ms2rgb.models.classifier import SceneCNN, SceneCNNConfig
from ms2rgb.models.matcher import CrossModalMatcher, MatcherConfig
from ms2rgb.tasks.data.atomic import write_atomic
from ms2rgb.tasks.errors import DataError
from ms2rgb.tasks.training import distributed

MODEL_FILE = "model.pt"
_BUILDERS: dict[str, tuple[type, type]] = {
    "scene_cnn": (SceneCNN, SceneCNNConfig),
    "matcher": (CrossModalMatcher, MatcherConfig),
}


def save_model(path: Path, kind: str, model: nn.Module, config: Any) -> Path:
    """Write weights + config atomically (a DVC output must never be half written)."""
    if kind not in _BUILDERS:
        raise ValueError(f"unknown model kind {kind!r}; valid kinds are {sorted(_BUILDERS)}")
    if not distributed.is_writer():  # under torchrun every process holds the same weights; one writes
        return path
    payload = {"kind": kind, "config": asdict(config), "state_dict": model.state_dict()}
    return write_atomic(path, lambda tmp: torch.save(payload, tmp))


@overload
def load_model(path: Path, kind: Literal["scene_cnn"], stage: str) -> SceneCNN: ...
@overload
def load_model(path: Path, kind: Literal["matcher"], stage: str) -> CrossModalMatcher: ...
@overload
def load_model(path: Path, kind: str, stage: str) -> nn.Module: ...
def load_model(path: Path, kind: str, stage: str) -> nn.Module:
    """Rebuild the model saved at `path` by `stage`, in eval mode on CPU."""
    if not path.exists():
        raise DataError(
            path,
            f"the {stage} model is missing",
            f"run the {stage} stage first (`ms2rgb stage {stage}` or `dvc repro {stage}`)",
        )
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("kind") != kind:
        raise DataError(
            path,
            f"holds a {payload.get('kind')!r} model, expected {kind!r}",
            f"re-run the {stage} stage so that it writes its own model",
        )
    model_cls, config_cls = _BUILDERS[kind]
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in payload["config"].items()}
    model = model_cls(config_cls(**config))
    model.load_state_dict(payload["state_dict"])
    return model.eval()
