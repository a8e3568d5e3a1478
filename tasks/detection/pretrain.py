"""The detector's backbone: given weights, or the fallback — contrastive pretraining on captions.

Offline there are no published CLIP weights, and prompt tuning a random CLIP would be
meaningless, so with ``clip.pretrained: null`` the project's tiny CLIP is first trained
CLIP-style on the ``captions`` split (image + caption from class description and mask
composition, ``tasks/detection/captions.py``) plus, since those tiles carry masks, a dense
patch-text alignment (``models/clip_dense.py``); saved to ``artifacts/detector/backbone.pt``
(a plain state dict that ``clip.pretrained`` accepts), registered as ``<prefix>-clip-backbone``
(``tracking.model_prefix``), frozen. A later run whose pretraining inputs are the same reuses the
previous run's backbone.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from ms2rgb.models.clip_backbone import freeze, load_clip
from ms2rgb.models.clip_dense import dense_alignment_loss, patch_embeddings, patch_shares
from ms2rgb.models.clip_detector import ClipPixels, ImageEmbedder
from ms2rgb.tasks.config import ClipConfig, PretrainConfig, PromptParams
from ms2rgb.tasks.data.atomic import write_atomic
from ms2rgb.tasks.data.cache import CachedSplit
from ms2rgb.tasks.data.classes import MASK_NODATA, SURFACE_CLASSES
from ms2rgb.tasks.detection.captions import captions
from ms2rgb.tasks.detection.data import load_tiles, sample_batch
from ms2rgb.tasks.errors import ParamsError
from ms2rgb.tasks.tracking import StageTracker
from ms2rgb.tasks.training import distributed
from ms2rgb.tasks.training.augment import random_dihedral
from ms2rgb.tasks.training.loop import adamw, autocast

BACKBONE_FILE = "backbone.pt"


class ServingOptions(TypedDict):
    """Keyword arguments of StageTracker.log_torch_model for the registered CLIP models."""

    serialization_format: str
    extra_requirements: tuple[str, ...]


# Registered CLIP models are pickled, not exported as pt2 graphs: an open-vocabulary detector must
# re-run its text tower on new class descriptions, which a traced forward with baked tokens cannot.
SERVING: ServingOptions = {
    "serialization_format": "pickle",
    "extra_requirements": (f"open_clip_torch=={open_clip.__version__}",),
}


def multi_positive_clip_loss(
    image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, caption_of: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE over B images and U distinct captions; every tile of a caption is its positive.

    Captions built from coarse share words repeat across tiles, and plain CLIP loss would push
    an image away from its own caption's duplicate (UniCL's multi-positive target fixes that).
    image (B, D), text (U, D) L2-normalised; caption_of (B,) indexes text.
    """
    logits = scale * image @ text.T  # (B, U)
    same = F.one_hot(caption_of, text.shape[0]).float().T  # (U, B)
    to_text = F.cross_entropy(logits, caption_of)
    to_image = F.cross_entropy(logits.T, same / same.sum(dim=1, keepdim=True))
    return 0.5 * (to_text + to_image)


def _optimiser(clip: nn.Module, cfg: PretrainConfig) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW without decay on gains/biases/embeddings' scale (CLIP), warm-up + cosine schedule."""
    params = [p for p in clip.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    opt = adamw(groups, cfg.lr)

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


@dataclass(frozen=True)
class DenseTargets:
    """What the dense alignment needs: the legend's tokenised descriptions, the layers it aligns
    (0-based, the prompts' similarity layers) and the patch-text temperature the prompts use."""

    class_tokens: torch.Tensor  # (K, L)
    layers: tuple[int, ...]
    scale: float


def _step_loss(
    clip: open_clip.CLIP,
    x: torch.Tensor,
    y: torch.Tensor,
    captions_tokens: torch.Tensor,
    caption_of: np.ndarray,
    dense: DenseTargets | None,
    dense_weight: float,
) -> torch.Tensor:
    """Multi-positive caption InfoNCE, plus the dense patch-text alignment when weighted."""
    last = len(clip.visual.transformer.resblocks) - 1
    aligned = dense.layers if dense is not None and dense_weight > 0 else ()
    patches, grid = patch_embeddings(clip, x, sorted({last, *aligned}))
    image = F.normalize(patches[last].mean(dim=1), dim=-1)  # the avg-pool image embedding
    text = clip.encode_text(captions_tokens, normalize=True)
    loss = multi_positive_clip_loss(
        image.float(), text.float(), clip.logit_scale.exp(), torch.as_tensor(caption_of, device=x.device)
    )
    if dense is None or not aligned:
        return loss
    class_text = clip.encode_text(dense.class_tokens, normalize=True).float()  # (K, D)
    shares = patch_shares(y, grid, class_text.shape[0], MASK_NODATA)
    return loss + dense_weight * dense_alignment_loss([patches[i] for i in aligned], class_text, shares, dense.scale)


def pretrain_clip(
    clip: open_clip.CLIP,
    tokenizer: Callable[..., torch.Tensor],
    split: CachedSplit,
    cfg: PretrainConfig,
    seed: int,
    device: torch.device,
    progress: Callable[[str], None] = print,
    classes: Mapping[str, str] = SURFACE_CLASSES,
    dense: DenseTargets | None = None,
) -> list[float]:
    """Train every CLIP parameter on the split's tiles: caption contrast, plus (with `dense` and
    cfg.dense_weight > 0) patch-text alignment to the masks; return step losses.
    `classes`: the masks' legend, whose descriptions the captions are written in."""
    images, masks = load_tiles(split)
    texts, caption_ids = np.unique(captions(split.labels, np.asarray(split.masks), classes), return_inverse=True)
    tokens = tokenizer(list(texts))  # (U, L)
    pixels = ClipPixels.for_clip(clip).to(device)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    clip.to(device).train()
    opt, sched = _optimiser(clip, cfg)
    if dense is not None:
        dense = DenseTargets(dense.class_tokens.to(device), dense.layers, dense.scale)
    losses: list[float] = []
    for step in range(cfg.steps):
        idx = sample_batch(len(images), cfg.batch_size, rng)
        x, y = random_dihedral((images[idx], masks[idx]), rng)
        used, caption_of = np.unique(caption_ids[idx], return_inverse=True)
        with autocast(device):
            loss = _step_loss(
                clip, pixels(x.to(device)), y.to(device), tokens[used].to(device), caption_of, dense, cfg.dense_weight
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, math.log(100))  # CLIP's cap on the temperature
        losses.append(float(loss.detach()))
        if step % 25 == 0 or step == cfg.steps - 1:
            progress(f"detector: pretrain step {step + 1}/{cfg.steps} loss {losses[-1]:.3f}")
    return losses


BACKBONE_INFO = "backbone.json"  # written last: a backbone.pt without it is from a run killed mid-registration


def _reused_backbone(clip: nn.Module, folders: Sequence[Path], out_dir: Path, identity: str) -> dict[str, Any] | None:
    """The fallback pretrained from the same inputs (`identity`) by a killed run of this stage (its
    staging folder) or by the last finished one (artifacts/detector), loaded into `clip`; else None.
    Tuning-only changes then skip the minutes of pretraining; the registered version is the old one."""
    for folder in folders:
        weights, info_file = folder / BACKBONE_FILE, folder / BACKBONE_INFO
        if not (weights.is_file() and info_file.is_file()):
            continue
        info: dict[str, Any] = json.loads(info_file.read_text())
        if info.get("identity") != identity:
            continue
        clip.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        if folder != out_dir:  # the stage's outputs are swapped in whole: carry the files over
            source, text = weights, json.dumps(info)
            write_atomic(out_dir / BACKBONE_FILE, lambda tmp: shutil.copyfile(source, tmp))  # noqa: B023 (called at once)
            write_atomic(out_dir / BACKBONE_INFO, lambda tmp: tmp.write_text(text))  # noqa: B023
        print(f"detector: fallback backbone reused from {folder} ({info['weights']})", flush=True)
        return info
    return None


def _pretrain_fallback(
    clip: nn.Module,
    tokenizer: Callable[..., torch.Tensor],
    captions_split: Callable[[], CachedSplit],
    cfg: PretrainConfig,
    model_name: str,
    registered_name: str,
    out_dir: Path,
    seed: int,
    device: torch.device,
    tracker: StageTracker,
    classes: Mapping[str, str],
    dense: DenseTargets,
    identity: str,
) -> dict[str, Any]:
    """Pretrain the fallback CLIP on the captions split, save and register it; its info."""
    with tracker.child("pretrain", tags={"ms2rgb.variant": "pretrain"}) as child:
        child.log_params({"pretrain": vars(cfg), "clip_model": model_name})
        start = time.perf_counter()
        losses = pretrain_clip(clip, tokenizer, captions_split(), cfg, seed, device, classes=classes, dense=dense)
        seconds = time.perf_counter() - start
        child.log_metric_series("pretrain_loss", losses)
        if distributed.is_writer():  # under torchrun every process pretrains the same weights; one writes
            write_atomic(out_dir / BACKBONE_FILE, lambda tmp: torch.save(clip.state_dict(), tmp))
        version = child.log_torch_model(
            ImageEmbedder(clip), np.zeros((1, 3, 64, 64), np.float32), registered_name, **SERVING
        )
        clip.to(device)  # log_torch_model moved it to the CPU
    info = {
        "weights": f"fallback:{registered_name} v{version} ({cfg.steps} steps on the captions split, "
        f"dense weight {cfg.dense_weight})",
        "pretrain_seconds": round(seconds, 2),
        "pretrain_final_loss": losses[-1],
        "backbone_file": BACKBONE_FILE,
        "backbone_version": version,
        "identity": identity,
    }
    if distributed.is_writer():
        write_atomic(out_dir / BACKBONE_INFO, lambda tmp: tmp.write_text(json.dumps(info)))
    return info


def dense_targets(
    clip: open_clip.CLIP,
    tokenizer: Callable[..., torch.Tensor],
    classes: Mapping[str, str],
    prompt: PromptParams | None,
) -> DenseTargets:
    """Align the layers the prompts will score (None: the last), at the temperature they score with
    (CLIP's usual 1/0.07 when they use the CLIP's own), to the legend's texts."""
    n_layers = len(clip.visual.transformer.resblocks)
    layers = prompt.similarity_layers if prompt is not None else (-1,)
    scale = prompt.logit_scale if prompt is not None and prompt.logit_scale else 1 / 0.07
    return DenseTargets(tokenizer(list(classes.values())), tuple(sorted({i % n_layers for i in layers})), scale)


def prepare_backbone(
    clip_cfg: ClipConfig,
    pretrain_cfg: PretrainConfig,
    captions_split: Callable[[], CachedSplit],
    out_dir: Path,
    seed: int,
    device: torch.device,
    tracker: StageTracker,
    classes: Mapping[str, str] = SURFACE_CLASSES,
    prompt: PromptParams | None = None,
    reuse: tuple[str, Sequence[Path]] = ("", ()),
    *,
    registered_name: str,
) -> tuple[nn.Module, Callable[..., torch.Tensor], dict[str, Any]]:
    """Load the configured weights or pretrain the fallback; return (frozen CLIP, tokenizer, info).
    `classes`: the legend of the captions split's masks; `prompt`: whose layers the dense term aligns
    (None: the last layer); `reuse`: (identity of the pretraining inputs, folders that may hold a
    backbone pretrained from them); `registered_name`: what the fallback is registered as
    (`<tracking.model_prefix>-clip-backbone`).

    info["weights"] says which weights the detector was tuned on; it is logged and reported.
    """
    torch.manual_seed(seed)  # the random init the fallback starts from
    clip, tokenizer, desc = load_clip(clip_cfg.model, clip_cfg.pretrained)
    info: dict[str, Any] = {"weights": desc, "clip_model": clip_cfg.model}
    if clip_cfg.pretrained is None:
        if pretrain_cfg.steps == 0:
            raise ParamsError(
                "detector.pretrain.steps",
                0,
                "with clip.pretrained: null the fallback must "
                "pretrain (steps >= 1), or name weights in detector.clip.pretrained",
            )
        identity, folders = reuse
        dense = dense_targets(clip, tokenizer, classes, prompt)
        info.update(
            (_reused_backbone(clip, [out_dir, *folders], out_dir, identity) if identity else None)
            or _pretrain_fallback(
                clip,
                tokenizer,
                captions_split,
                pretrain_cfg,
                clip_cfg.model,
                registered_name,
                out_dir,
                seed,
                device,
                tracker,
                classes,
                dense,
                identity,
            )
        )
    tracker.log_params({"clip.weights": info["weights"]})
    return freeze(clip.to(device)), tokenizer, info
