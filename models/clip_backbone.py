"""Build a frozen open_clip CLIP whose visual tower yields patch tokens (docs/methods.md §B.1).

Method B needs per-patch tokens from a plain ViT and a text tower with token
embeddings it can splice prompts into, so only native open_clip ViT + text
transformer architectures are accepted. Weights come from nowhere (random init,
for tests and offline smoke runs), a local checkpoint file (how RemoteCLIP /
GeoRSCLIP / SkyCLIP ship open_clip-compatible weights) or an open_clip pretrained
tag (needs the network).

The project registers its own tiny config, ``ms2rgb-tiny-vit``
(``models/clip_configs/ms2rgb-tiny-vit.json``), through ``open_clip.add_model_config``
when this module is imported, so tests never need downloaded weights. Its visual tower
pools by averaging the patch tokens (``pool_type: avg``) instead of reading a class token:
contrastive pretraining on captions that list a tile's surfaces then has to make each
patch's projected token carry its own surface, which is what per-patch prompting scores
(on the default synthetic data, 150 pretraining steps then 120 coupled-prompt tuning steps
at K=16 gave mIoU 0.15 with a class token and 0.38 with mean pooling, seed 0).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import nn

CONFIG_DIR = Path(__file__).parent / "clip_configs"
TINY_MODEL = "ms2rgb-tiny-vit"


class UnknownClipModelError(ValueError):
    """The model name is not an open_clip config known to this process."""


class UnsupportedClipModelError(ValueError):
    """The config exists but its towers cannot be prompted per patch (e.g. a ResNet)."""


class ClipWeightsError(RuntimeError):
    """Weights could not be fetched or did not fit the architecture."""


def register_configs(config_dir: Path = CONFIG_DIR) -> None:
    """Add the project's JSON configs to open_clip's registry (idempotent)."""
    names = {p.stem for p in config_dir.glob("*.json")}
    # add_model_config appends to a global path list on every call; skip re-adding.
    if not names.issubset(open_clip.list_models()):
        open_clip.add_model_config(config_dir)


register_configs()


def unsupported_reason(model_cfg: dict[str, Any]) -> str | None:
    """Why a config cannot be used for patch-level prompting, or None if it can."""
    vision = model_cfg.get("vision_cfg", {})
    text = model_cfg.get("text_cfg", {})
    if vision.get("timm_model_name"):
        return f"its visual tower is the timm model {vision['timm_model_name']!r}"
    if not isinstance(vision.get("layers", 12), int):
        return "its visual tower is a ResNet (no patch tokens)"
    if vision.get("attentional_pool"):
        return "its visual tower pools with an attentional pooler (CoCa-style)"
    if text.get("hf_model_name") or model_cfg.get("custom_text"):
        return "its text tower is not open_clip's own TextTransformer"
    if text.get("hf_tokenizer_name"):
        # Prompts go right after the start token; some HF tokenizers (mT5) have none.
        return f"it uses the HuggingFace tokenizer {text['hf_tokenizer_name']!r}, not CLIP's BPE"
    if text.get("pool_type", "argmax") != "argmax" or text.get("embed_cls"):
        return "its text tower does not pool at the end-of-text token"
    if model_cfg.get("multimodal_cfg"):
        return "it is a captioning (CoCa) model"
    return None


def supported_models() -> list[str]:
    """open_clip config names usable by PromptedCLIP (native ViT + transformer text)."""
    return [name for name in open_clip.list_models() if unsupported_reason(open_clip.get_model_config(name)) is None]


def _check_model_name(model_name: str) -> None:
    """Raise a typed error naming the valid choices when model_name cannot be used."""
    cfg = open_clip.get_model_config(model_name) if model_name in open_clip.list_models() else None
    if cfg is None:
        raise UnknownClipModelError(
            f"unknown CLIP model {model_name!r}; use one of the ViT configs "
            f"{supported_models()} (or register yours with open_clip.add_model_config)"
        )
    reason = unsupported_reason(cfg)
    if reason is not None:
        raise UnsupportedClipModelError(
            f"CLIP model {model_name!r} cannot be prompted per patch: {reason}. "
            f"Pick a ViT config such as 'ViT-B-32', 'ViT-B-16' or {TINY_MODEL!r}."
        )


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Load a state dict from a file, unwrapping {"state_dict": ...} and DDP's 'module.'."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file  # optional dependency of open_clip

            obj: Any = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt / TorchScript files
        raise ClipWeightsError(
            f"could not read CLIP checkpoint {path}: {err}. Save weights with "
            f"torch.save(model.state_dict(), path) (TorchScript archives are not supported)."
        ) from err
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ClipWeightsError(f"CLIP checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in obj.items()}


class _DropRandomInitNotice(logging.Filter):
    """Drops open_clip's "No pretrained weights loaded ... initialized randomly" record: load_clip
    builds the architecture with pretrained=None and then loads weights itself, so the notice would
    be false; load_clip's own description says which weights the model carries."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


@contextlib.contextmanager
def _quiet_random_init() -> Iterator[None]:
    notice, root = _DropRandomInitNotice(), logging.getLogger()  # open_clip logs through the root logger
    root.addFilter(notice)
    try:
        yield
    finally:
        root.removeFilter(notice)


def _random_model(model_name: str) -> nn.Module:
    """The architecture at random init, without open_clip's notice (see _DropRandomInitNotice)."""
    with _quiet_random_init():
        return open_clip.create_model(model_name, pretrained=None)


def _load_local(model_name: str, path: Path) -> nn.Module:
    """Create the architecture at random and copy the file's weights into it (strict)."""
    model = _random_model(model_name)
    state = _read_checkpoint(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ClipWeightsError(
            f"checkpoint {path} does not fit CLIP model {model_name!r}: {err}. "
            f"Check that clip.model names the architecture the checkpoint was trained with."
        ) from err
    return model


def _load_tag(model_name: str, tag: str) -> nn.Module:
    """Let open_clip fetch a pretrained tag; wrap offline / unknown-tag failures."""
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    hint = "pass a local checkpoint path or null (random init) instead"
    if tag not in tags:
        # Checked first so a typo fails at once instead of after network retries.
        raise ClipWeightsError(
            f"{tag!r} is neither an existing file nor a known pretrained tag of {model_name!r} "
            f"(known tags: {tags}); {hint}"
        )
    try:
        return open_clip.create_model(model_name, pretrained=tag)
    except Exception as err:  # open_clip raises RuntimeError, hub raises its own types
        raise ClipWeightsError(
            f"pretrained tag {tag!r} of {model_name!r} could not be fetched ({err}); {hint}"
        ) from err


def load_clip(
    model_name: str, pretrained: str | None, device: str | torch.device = "cpu"
) -> tuple[nn.Module, Callable[..., torch.Tensor], str]:
    """Build an open_clip CLIP, its tokenizer and a short description of its weights.

    Args:
        model_name: an open_clip config name with a native ViT visual tower.
        pretrained: None for random init, a path to a local state-dict file, or an
            open_clip pretrained tag such as "openai" (needs network access).
        device: where to put the model.

    Returns:
        (model, tokenizer, weights_desc) where weights_desc is "random-init",
        "file:<file name>" or "open_clip:<tag>".
    """
    _check_model_name(model_name)
    if pretrained is None:
        model, desc = _random_model(model_name), "random-init"
    else:
        path = Path(pretrained).expanduser()
        if path.is_file():
            model, desc = _load_local(model_name, path), f"file:{path.name}"
        elif path.suffix in {".pt", ".pth", ".bin", ".safetensors", ".ckpt"} or "/" in pretrained:
            raise FileNotFoundError(
                f"CLIP checkpoint {pretrained!r} does not exist; fix clip.pretrained or set it to null"
            )
        else:
            model, desc = _load_tag(model_name, pretrained), f"open_clip:{pretrained}"
    tokenizer = open_clip.get_tokenizer(model_name)
    return model.to(device), tokenizer, desc


def freeze(model: nn.Module) -> nn.Module:
    """Stop gradients to every parameter and switch to eval mode; returns the model."""
    for param in model.parameters():
        param.requires_grad_(False)
    return model.eval()
