"""Tiles for the detector: K-shot selection and seeded batches.

Batches (and the dihedral augmentation, `tasks/training/augment.py`) are drawn with a numpy
Generator whose state a checkpoint can store, so a resumed run draws exactly the batches the
uninterrupted run would have drawn.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from ms2rgb.tasks.data.cache import CachedSplit
from ms2rgb.tasks.data.classes import MASK_NODATA, first_k_of_each
from ms2rgb.tasks.errors import Ms2rgbError


def shot_groups(split: CachedSplit) -> np.ndarray:
    """What "K per class" counts: the scene class, or for unlabelled tiles (scene tiles labelled by
    spectral indices) the surface that covers most of the tile's labelled pixels (-1: none)."""
    if (split.labels >= 0).any() or split.masks is None:
        return split.labels
    masks = np.asarray(split.masks).reshape(len(split.labels), -1).astype(np.int64)  # (N, H*W)
    # One histogram of mask values per tile, whatever the legend's size; ignored pixels never count.
    values = MASK_NODATA + 1  # uint8 masks: every value 0..MASK_NODATA gets a bin
    rows = np.arange(len(masks))[:, None] * values
    counts = np.bincount((rows + masks).ravel(), minlength=len(masks) * values).reshape(len(masks), values)
    counts[:, MASK_NODATA] = 0
    return np.where(counts.max(1) > 0, counts.argmax(1), -1)


def spread_over_locations(groups: np.ndarray, locations: Sequence[str]) -> np.ndarray:
    """Row indices in the order shots are taken: every location's first tile of a class before any
    location's second, cache order within a round.

    Tiles cut from one image or scene block share a location, and cache order lists them together:
    K shots taken in plain cache order came from one or two images of a user's own masks (aerial
    sample: every `land` and `water` shot from a single image). Where every tile is its own location
    (the synthetic tiles) this is plain cache order.
    """
    # n-th tile of its (class, location) pair, counted in cache order
    rank = pd.DataFrame({"group": groups, "location": locations}).groupby(["group", "location"]).cumcount()
    return np.lexsort((np.arange(len(groups)), rank.to_numpy()))  # by rank within (class, location), then cache order


def first_k_per_class(split: CachedSplit, k: int) -> np.ndarray:
    """Row indices (ascending) of K tiles of every class present in the split (shot_groups), spread over
    the split's locations (`spread_over_locations`)."""
    if k < 1:
        raise Ms2rgbError(f"K={k} shots per class: K must be >= 1")
    groups = shot_groups(split)
    by_surface = groups is not split.labels  # weak labels: a surface that dominates few tiles gives what it has
    values, counts = np.unique(groups[groups >= 0], return_counts=True)
    if not by_surface and (counts < k).any():
        short = int(values[np.argmin(counts)])
        raise Ms2rgbError(
            f"the few-shot split has {int(counts.min())} tile(s) of class {short}, fewer than "
            f"K={k}; lower detector.shots or give the few-shot split more tiles and re-run prepare"
        )
    order = spread_over_locations(groups, split.location_ids)
    return np.sort(order[first_k_of_each(groups[order], k)])


def load_tiles(split: CachedSplit, rows: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 3, H, W) uint8, masks (N, H, W) uint8) read into memory (few-shot sets are small)."""
    if split.masks is None:
        raise Ms2rgbError("the detector needs tiles with land-cover masks; re-run prepare (fewshot/seg_test/captions)")
    rows = np.arange(len(split.ids)) if rows is None else rows
    return torch.from_numpy(np.ascontiguousarray(split.images[rows])), torch.from_numpy(
        np.ascontiguousarray(split.masks[rows])
    )


def sample_batch(n: int, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of one training batch: without replacement, the whole set when it is smaller."""
    return np.sort(rng.choice(n, size=min(batch_size, n), replace=False))
