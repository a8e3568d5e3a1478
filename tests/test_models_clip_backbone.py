"""load_clip / freeze: config registry, local checkpoints, typed errors. No network."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import open_clip
import pytest
import torch

from ms2rgb.models.clip_backbone import (
    CONFIG_DIR,
    TINY_MODEL,
    ClipWeightsError,
    UnknownClipModelError,
    UnsupportedClipModelError,
    freeze,
    load_clip,
    register_configs,
    supported_models,
)


@pytest.fixture(scope="module")
def tiny() -> tuple[torch.nn.Module, object, str]:
    torch.manual_seed(0)
    return load_clip(TINY_MODEL, None)


def test_tiny_config_registered_and_built_from_json(tiny: tuple) -> None:
    model, tokenizer, desc = tiny
    cfg = json.loads((CONFIG_DIR / f"{TINY_MODEL}.json").read_text())
    assert TINY_MODEL in open_clip.list_models()
    assert open_clip.get_model_config(TINY_MODEL) == cfg
    assert desc == "random-init"
    assert isinstance(model, open_clip.CLIP)
    assert model.visual.image_size == (64, 64) and model.visual.patch_size == (8, 8)
    assert len(model.visual.transformer.resblocks) == cfg["vision_cfg"]["layers"]
    assert model.text_projection.shape == (cfg["text_cfg"]["width"], cfg["embed_dim"])
    tokens = tokenizer(["forest", "sea lake"])
    assert tokens.shape == (2, cfg["text_cfg"]["context_length"])


def test_register_configs_is_idempotent() -> None:
    before = len(open_clip.factory._MODEL_CONFIG_PATHS)
    register_configs()
    assert len(open_clip.factory._MODEL_CONFIG_PATHS) == before


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("wrap", ["plain", "lightning_ddp"])
def test_load_clip_from_local_checkpoint_round_trips(
    tiny: tuple, tmp_path: Path, wrap: str, caplog: pytest.LogCaptureFixture
) -> None:
    model, _, _ = tiny
    state = _state(model)
    if wrap == "lightning_ddp":
        payload: dict = {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}
    else:
        payload = state
    path = tmp_path / "remote_clip_like.pt"
    torch.save(payload, path)
    torch.manual_seed(123)  # a different random init, so equality proves the file was read
    with caplog.at_level(logging.WARNING):
        loaded, _, desc = load_clip(TINY_MODEL, str(path))
    assert desc == "file:remote_clip_like.pt"
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), key
    # open_clip's "initialized randomly" notice would be false here: the file's weights are loaded.
    assert not [r for r in caplog.records if "initialized randomly" in r.getMessage()]
    logging.warning("No pretrained weights loaded: a notice logged outside load_clip still gets through")
    assert caplog.records[-1].getMessage().startswith("No pretrained weights loaded: a notice")


def test_checkpoint_that_does_not_fit_raises(tiny: tuple, tmp_path: Path) -> None:
    state = _state(tiny[0])
    state.pop("text_projection")
    path = tmp_path / "partial.pt"
    torch.save(state, path)
    with pytest.raises(ClipWeightsError, match="does not fit CLIP model"):
        load_clip(TINY_MODEL, str(path))


def test_missing_checkpoint_path_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_clip(TINY_MODEL, str(tmp_path / "nope.pt"))


def test_unknown_tag_fails_fast_with_advice() -> None:
    with pytest.raises(ClipWeightsError, match="local checkpoint path or null"):
        load_clip(TINY_MODEL, "openai")  # the tiny config has no published weights


def test_tag_fetch_failure_is_wrapped(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Name or service not known")

    monkeypatch.setattr(open_clip, "create_model", offline)  # no network attempt at all
    with pytest.raises(ClipWeightsError, match="could not be fetched.*local checkpoint path or null"):
        load_clip("ViT-B-32", "openai")


def test_unknown_model_lists_valid_vit_names() -> None:
    with pytest.raises(UnknownClipModelError) as err:
        load_clip("ViT-Q-99", None)
    msg = str(err.value)
    assert TINY_MODEL in msg and "'ViT-B-32'" in msg and "'ViT-L-14'" in msg
    assert "RN50" not in msg and "convnext" not in msg


@pytest.mark.parametrize("name", ["RN50", "convnext_base", "coca_ViT-B-32"])
def test_non_vit_towers_are_rejected(name: str) -> None:
    assert name in open_clip.list_models()
    assert name not in supported_models()
    with pytest.raises(UnsupportedClipModelError, match="cannot be prompted per patch"):
        load_clip(name, None)


def test_freeze_stops_grads_and_sets_eval() -> None:
    torch.manual_seed(1)
    model, _, _ = load_clip(TINY_MODEL, None)
    model.train()
    assert freeze(model) is model
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
