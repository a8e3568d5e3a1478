"""Load the tuned detector: from ``artifacts/detector/`` or an MLflow model URI.

Which one `ms2rgb detect` uses without ``--model`` is decided in ``detect.choose_detector``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import open_clip
import torch

from ms2rgb.models.clip_backbone import load_clip  # importing it registers the project's CLIP configs
from ms2rgb.models.clip_detector import ClassMapDetector, detector_from_payload
from ms2rgb.models.pixel_evidence import evidence_spec
from ms2rgb.tasks.data.pixel_size import recorded_pixel_size
from ms2rgb.tasks.errors import Ms2rgbError

OUT_DIR = "artifacts/detector"
DETECTOR_FILE = "detector.pt"


def resolve_pretrained(root: Path, pretrained: str | None) -> str | None:
    """A relative checkpoint path in params means relative to the project root, wherever we run from."""
    if pretrained is not None and not Path(pretrained).is_absolute() and (root / pretrained).is_file():
        return str(root / pretrained)
    return pretrained


def evidence_payload(detector: ClassMapDetector) -> dict[str, Any] | None:
    """What detector.pt keeps of the pixel evidence (its kind and shape, fitted state, tuned weight), or None."""
    if detector.evidence is None or detector.evidence_weight is None:
        return None
    return {
        **evidence_spec(detector.evidence),
        "state": detector.evidence.state_dict(),
        "weight": float(detector.evidence_weight.detach()),
    }


def detector_from_state(
    state: dict[str, Any], clip: torch.nn.Module, tokenizer: Callable[..., torch.Tensor], source: Path
) -> ClassMapDetector:
    """The ClassMapDetector a detector.pt payload describes, around the CLIP its weights were loaded into."""
    try:
        return detector_from_payload(state, clip, tokenizer, recorded_pixel_size(state))
    except ValueError as err:
        raise Ms2rgbError(f"{source} {err}; re-run the detector stage") from err


def load_local(root: Path) -> ClassMapDetector:
    """Rebuild the detector from artifacts/detector/detector.pt and the backbone weights it names."""
    return load_local_with_weights(root)[0]


def _detector_hint(root: Path) -> str:
    """The project's registered detector, for a fix (tasks/tracking/champion.py)."""
    from ms2rgb.tasks.tracking.champion import name_hint

    return name_hint(root, "detector")


def load_local_with_weights(root: Path) -> tuple[ClassMapDetector, str]:
    """load_local, and which CLIP weights it carries (load_clip's description, e.g. "file:backbone.pt")."""
    path = root / OUT_DIR / DETECTOR_FILE
    if not path.is_file():
        raise Ms2rgbError(
            f"{path} does not exist: run the detector stage first (`ms2rgb stage detector` or "
            f"`dvc repro detector`), or pass --model models:/{_detector_hint(root)}/<version>"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    pretrained = state["clip_pretrained"]
    pretrained = (
        str(path.parent / pretrained) if state["pretrained_in_artifacts"] else resolve_pretrained(root, pretrained)
    )
    clip, tokenizer, weights = load_clip(state["clip_model"], pretrained)
    return detector_from_state(state, clip, tokenizer, path), weights


def load_detector(root: Path, model_uri: str | None = None) -> tuple[ClassMapDetector, str]:
    """(detector, where it came from): the stage's artifacts for None, else the registered model URI."""
    if model_uri is None:
        model, weights = load_local_with_weights(root)
        return model, f"{root / OUT_DIR / DETECTOR_FILE} (CLIP weights {weights})"
    from ms2rgb.tasks.tracking import load_torch_model

    try:
        model = load_torch_model(root, model_uri)
    except Exception as err:  # MLflow raises its own types for unknown names / versions / stores
        raise Ms2rgbError(
            f"--model {model_uri!r} could not be loaded ({err}); use models:/{_detector_hint(root)}/"
            f"<version> from this project's MLflow store, or leave --model out"
        ) from err
    if not isinstance(model, ClassMapDetector):
        raise Ms2rgbError(
            f"--model {model_uri!r} is a {type(model).__name__}, not a ClassMapDetector; "
            f"pass a version of {_detector_hint(root)}"
        )
    return model, model_uri


def tokenizer_for(detector: ClassMapDetector) -> Callable[..., torch.Tensor]:
    """The tokenizer of the detector's CLIP, for class descriptions given at inference."""
    return open_clip.get_tokenizer(detector.clip_model)
