"""Tiles for the detector: K-shot selection, seeded batches and dihedral augmentation.

Batches are drawn with a numpy Generator whose state a checkpoint can store, so a resumed
run draws exactly the batches the uninterrupted run would have drawn.
"""
from __future__ import annotations

import numpy as np
import torch

from ms2rgb.tasks.data.cache import CachedSplit
from ms2rgb.tasks.errors import Ms2rgbError


def first_k_per_class(split: CachedSplit, k: int) -> np.ndarray:
    """Row indices of the first K tiles (cache order) of every scene class present in the split."""
    if k < 1:
        raise Ms2rgbError(f"K={k} shots per class: K must be >= 1")
    rows = []
    for label in np.unique(split.labels[split.labels >= 0]):
        members = np.flatnonzero(split.labels == label)
        if len(members) < k:
            raise Ms2rgbError(
                f"the few-shot split has {len(members)} tile(s) of scene class {int(label)}, fewer than "
                f"K={k}; lower detector.shots or raise synth.per_class.fewshot and re-run prepare"
            )
        rows.append(members[:k])
    return np.sort(np.concatenate(rows))


def load_tiles(split: CachedSplit, rows: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 3, H, W) uint8, masks (N, H, W) uint8) read into memory (few-shot sets are small)."""
    if split.masks is None:
        raise Ms2rgbError("the detector needs tiles with land-cover masks; re-run prepare (fewshot/seg_test/captions)")
    rows = np.arange(len(split.ids)) if rows is None else rows
    return torch.from_numpy(np.ascontiguousarray(split.images[rows])), torch.from_numpy(
        np.ascontiguousarray(split.masks[rows]))


def dihedral(x: torch.Tensor, code: int) -> torch.Tensor:
    """One of the 8 rotations/flips of the last two axes (code 0 = identity)."""
    x = torch.rot90(x, code % 4, dims=(-2, -1))
    return x.flip(-1) if code >= 4 else x


def augment(images: torch.Tensor, masks: torch.Tensor | None, rng: np.random.Generator
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply a random dihedral transform per tile (land cover seen from above has no 'up')."""
    codes = rng.integers(0, 8, len(images))
    images = images.clone()
    masks = None if masks is None else masks.clone()
    for code in np.unique(codes):
        sel = torch.from_numpy(np.flatnonzero(codes == code))
        images[sel] = dihedral(images[sel], int(code))
        if masks is not None:
            masks[sel] = dihedral(masks[sel], int(code))
    return images, masks


def sample_batch(n: int, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of one training batch: without replacement, the whole set when it is smaller."""
    return np.sort(rng.choice(n, size=min(batch_size, n), replace=False))
