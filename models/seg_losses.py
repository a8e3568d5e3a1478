"""Dense classification losses for the class-map predictor (docs/methods.md §B.5: focal + dice).

All losses take logits (B, K, H, W) and an integer target (B, H, W); pixels equal to
``ignore_index`` count nowhere.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def _check(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Validate shapes and labels; return the (B, H, W) mask of pixels that count."""
    if logits.ndim != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"logits must be (B, K, H, W) and target (B, H, W) with matching B, H, W; got "
            f"logits {tuple(logits.shape)} and target {tuple(target.shape)}"
        )
    if target.dtype not in (torch.int64, torch.int32, torch.uint8, torch.int16):
        raise ValueError(f"target must hold integer class ids, got dtype {target.dtype}")
    valid = target != ignore_index
    if valid.any() and (target[valid].min() < 0 or target[valid].max() >= logits.shape[1]):
        raise ValueError(f"target holds class ids outside 0..{logits.shape[1] - 1} (ignore_index={ignore_index})")
    return valid


# Sums a tensor over every process that holds a slice of the batch, differentiably (the training
# layer's distributed.sum_over_processes); None when the whole batch is here.
Total = Callable[[torch.Tensor], torch.Tensor]


def focal_loss(
    logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, ignore_index: int = 255, total: Total | None = None
) -> torch.Tensor:
    """Multi-class focal loss, mean over valid pixels: -(1 - p_t)^gamma log p_t. With `total`, the mean
    over the valid pixels of every process's slice, the same on each."""
    valid = _check(logits, target, ignore_index)
    if total is None and not valid.any():
        return logits.sum() * 0.0  # keeps the graph alive for an all-ignored batch
    safe = torch.where(valid, target.long(), torch.zeros_like(target, dtype=torch.long))
    log_pt = F.log_softmax(logits.float(), dim=1).gather(1, safe.unsqueeze(1)).squeeze(1)  # (B, H, W)
    loss = -((1.0 - log_pt.exp()) ** gamma) * log_pt
    if total is None:
        return loss[valid].mean()
    summed = total(torch.stack([loss[valid].sum() + logits.sum() * 0.0, valid.sum().float()]))  # (2,)
    return summed[0] / summed[1].clamp(min=1.0)  # a slice with no valid pixel still joins the sum


def dice_loss(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255, eps: float = 1.0, total: Total | None = None
) -> torch.Tensor:
    """Soft multi-class dice loss: 1 - mean dice over the classes present in the target.

    Classes absent from the target are skipped so a few-shot batch that shows two of
    ten classes is not rewarded for predicting the other eight nowhere. With `total`, the
    overlaps and areas are those of every process's slice together, as in one batch.
    """
    valid = _check(logits, target, ignore_index)
    if total is None and not valid.any():
        return logits.sum() * 0.0
    k = logits.shape[1]
    probs = F.softmax(logits.float(), dim=1) * valid.unsqueeze(1)  # (B, K, H, W), ignored pixels zeroed
    safe = torch.where(valid, target.long(), torch.zeros_like(target, dtype=torch.long))
    onehot = F.one_hot(safe, k).permute(0, 3, 1, 2).float() * valid.unsqueeze(1)  # (B, K, H, W)
    inter = (probs * onehot).sum(dim=(0, 2, 3))  # (K,)
    area = onehot.sum(dim=(0, 2, 3))  # (K,)
    denom = probs.sum(dim=(0, 2, 3)) + area  # (K,)
    if total is not None:
        inter, denom, area = total(torch.stack([inter, denom, area])).unbind(0)  # (K,) each
        if not bool((area > 0).any()):
            return logits.sum() * 0.0
    dice = (2.0 * inter + eps) / (denom + eps)
    present = area > 0
    return 1.0 - dice[present].mean()


def segmentation_loss(
    logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, ignore_index: int = 255, total: Total | None = None
) -> torch.Tensor:
    """Focal + dice, the per-map loss AnomalyCLIP trains with (`total`: see focal_loss and dice_loss)."""
    focal = focal_loss(logits, target, gamma, ignore_index, total)
    return focal + dice_loss(logits, target, ignore_index, total=total)
