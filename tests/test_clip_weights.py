"""Real CLIP weights through the detector stage's backbone loading (issue 23, item 4).

`detector.clip.pretrained` names a checkpoint file (relative to the project root) or an open_clip
tag; the stage resolves it (`tasks/detection/model.resolve_pretrained`) and loads it
(`tasks/detection/pretrain.prepare_backbone`). Here a checkpoint built from a registered config
goes that way end to end, and every open_clip download entry point is patched to raise, so a test
that passes proves nothing was fetched. Loader details (DDP prefixes, wrong shapes) are in
test_models_clip_backbone.py; the whole stage with a saved backbone in test_detector_stage.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import huggingface_hub
import numpy as np
import open_clip
import pytest
import torch
from helpers_params import config

from ms2rgb.models.clip_backbone import TINY_MODEL, ClipWeightsError
from ms2rgb.tasks.data.cache import CachedSplit
from ms2rgb.tasks.data.classes import SURFACE_NAMES
from ms2rgb.tasks.detection.model import resolve_pretrained
from ms2rgb.tasks.detection.pretrain import BACKBONE_FILE, prepare_backbone

CPU = torch.device("cpu")
BACKBONE_MODEL = "team-a-clip-backbone"  # what the stage passes: <tracking.model_prefix>-clip-backbone


class DownloadAttempted(RuntimeError):
    """Raised by every patched download function: the test machine must never fetch weights."""


@pytest.fixture
def downloads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every open_clip / Hugging Face download entry point raises; the names of those called."""
    attempts: list[str] = []

    def refuse(name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> None:
            attempts.append(name)
            raise DownloadAttempted(f"{name} called: a download was attempted")

        return call

    # open_clip binds some of these by name in several modules: patch each binding it calls through.
    for module, name in [
        (open_clip.factory, "download_pretrained"),
        (open_clip.factory, "download_pretrained_from_hf"),
        (open_clip.pretrained, "download_pretrained"),
        (open_clip.pretrained, "download_pretrained_from_url"),
        (open_clip.pretrained, "download_pretrained_from_hf"),
        (open_clip.pretrained, "hf_hub_download"),
        (open_clip.openai, "download_pretrained_from_url"),
        (huggingface_hub, "hf_hub_download"),
    ]:
        monkeypatch.setattr(module, name, refuse(f"{module.__name__}.{name}"))
    return attempts


class RecordingTracker:
    """The few StageTracker calls prepare_backbone makes, recorded (no MLflow store needed)."""

    def __init__(self) -> None:
        self.params: list[dict[str, Any]] = []
        self.models: list[str] = []

    def log_params(self, params: dict[str, Any]) -> None:
        self.params.append(params)

    def log_metric_series(self, key: str, values: list[float], first_step: int = 1) -> None:
        pass

    def log_torch_model(self, model: torch.nn.Module, example: np.ndarray, name: str, **kwargs: Any) -> int:
        self.models.append(name)
        return len(self.models)

    @contextmanager
    def child(self, name: str, tags: dict[str, str] | None = None) -> Iterator[RecordingTracker]:
        yield self


def never_captions() -> CachedSplit:
    raise AssertionError("the captions split was opened: the fallback was pretrained although weights were given")


def captions_split() -> CachedSplit:
    """Six random captioned tiles: enough for a one-step fallback pretraining."""
    gen = np.random.default_rng(3)
    return CachedSplit(
        images=gen.integers(0, 256, (6, 3, 64, 64), dtype=np.uint8),
        labels=np.array([0, 1, 2, 8, 9, 9]),
        ids=[str(i) for i in range(6)],
        location_ids=[str(i) for i in range(6)],
        masks=gen.integers(0, len(SURFACE_NAMES), (6, 64, 64), dtype=np.uint8),
    )


def test_a_checkpoint_built_from_a_registered_config_is_the_backbone_and_nothing_is_pretrained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, downloads: list[str]
) -> None:
    """What a RemoteCLIP / GeoRSCLIP user does, with the tiny registered config standing in for ViT-B-32:
    save a state dict, name it relative to the project root, run the stage's backbone loading."""
    root = tmp_path / "project"
    (root / "weights").mkdir(parents=True)
    torch.manual_seed(7)
    source = open_clip.create_model(TINY_MODEL, pretrained=None)  # registered by importing clip_backbone
    torch.save(source.state_dict(), root / "weights" / "rs_clip.pt")
    monkeypatch.chdir(tmp_path)  # the relative path must be found from the root, not the working directory
    clip_cfg = config("detector.clip", pretrained="weights/rs_clip.pt")  # as params.yaml would say it
    resolved = clip_cfg.model_copy(update={"pretrained": resolve_pretrained(root, clip_cfg.pretrained)})
    assert resolved.pretrained == str(root / "weights" / "rs_clip.pt")
    tracker, out_dir = RecordingTracker(), root / "artifacts" / "detector"
    torch.manual_seed(123)  # another random init: equal weights below prove the file was read
    clip, tokenizer, info = prepare_backbone(
        resolved,
        config("detector.pretrain"),
        never_captions,
        out_dir,
        0,
        CPU,
        tracker=tracker,
        registered_name=BACKBONE_MODEL,
    )
    assert info == {"weights": "file:rs_clip.pt", "clip_model": TINY_MODEL}  # no pretrain_seconds, no backbone_file
    assert tracker.params == [{"clip.weights": "file:rs_clip.pt"}] and tracker.models == []
    assert not (out_dir / BACKBONE_FILE).exists()
    for key, value in source.state_dict().items():
        assert torch.equal(clip.state_dict()[key], value), key
    assert not clip.training and not any(p.requires_grad for p in clip.parameters())
    assert tokenizer(["water"]).shape[0] == 1 and downloads == []


def test_nothing_configured_pretrains_the_fallback_and_downloads_nothing(tmp_path: Path, downloads: list[str]) -> None:
    clip_cfg = config("detector.clip")
    assert clip_cfg.pretrained is None and clip_cfg.model == TINY_MODEL  # the shipped default
    pretrain_cfg = config("detector.pretrain", steps=1, batch_size=4, warmup_steps=1)
    tracker, out_dir = RecordingTracker(), tmp_path / "detector"
    out_dir.mkdir()
    _, _, info = prepare_backbone(
        clip_cfg, pretrain_cfg, captions_split, out_dir, 0, CPU, tracker=tracker, registered_name=BACKBONE_MODEL
    )
    assert info["weights"].startswith(f"fallback:{BACKBONE_MODEL} v1 (1 steps on the captions split")
    assert (out_dir / BACKBONE_FILE).is_file() and tracker.models == [BACKBONE_MODEL]
    assert downloads == []


def test_an_open_clip_tag_is_fetched_through_the_guarded_functions(tmp_path: Path, downloads: list[str]) -> None:
    """The guard above is live: a tag (what a user with internet access sets) reaches it, fails
    without a network, and says what to set instead."""
    clip_cfg = config("detector.clip", model="ViT-B-32", pretrained="laion2b_s34b_b79k")
    with pytest.raises(ClipWeightsError, match="could not be fetched.*local checkpoint path or null"):
        prepare_backbone(
            clip_cfg,
            config("detector.pretrain"),
            never_captions,
            tmp_path,
            0,
            CPU,
            tracker=None,
            registered_name=BACKBONE_MODEL,
        )
    assert downloads == ["open_clip.factory.download_pretrained"]
