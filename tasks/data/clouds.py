"""Cloud masks of Sentinel-2 L1C tiles from s2cloudless, the field's own pixel classifier for L1C.

s2cloudless (Sentinel Hub) is a LightGBM model over 10 L1C bands. Its model file ships inside the
wheel, so masks are computed offline. It scores pixels one at a time, with no spatial context, so a
tile is scored at 40 m (`FACTOR` x `FACTOR` blocks of 10 m pixels averaged): 16 times cheaper than
at 10 m, and still finer than the 60 m its authors recommend. A cloudy pool tile would teach the
pairing and the detector what clouds look like, not the ground.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np

FACTOR = 4  # 10 m pixels per side of a scored block: tiles are scored at 40 m
THRESHOLD = 0.4  # s2cloudless's default cloud-probability threshold


@cache
def _detector() -> Any:
    # Imported here: s2cloudless pulls in sentinelhub (about 2 s), which only ingestion needs.
    from s2cloudless import S2PixelCloudDetector

    # average_over / dilation_size are in scored (40 m) pixels: one block of smoothing and of margin.
    return S2PixelCloudDetector(threshold=THRESHOLD, all_bands=True, average_over=1, dilation_size=1)


def cloud_masks(tiles: np.ndarray) -> np.ndarray:
    """(N, H, W) bool: cloud (or its margin) for (N, 13, H, W) uint16 L1C tiles in S2_BANDS order.

    H and W must be multiples of FACTOR. Pixels that are no-data (0 in every band) are never cloud.
    """
    n, bands, height, width = tiles.shape
    if bands != 13 or height % FACTOR or width % FACTOR:
        raise ValueError(f"cloud_masks needs (N, 13, H, W) tiles with H, W multiples of {FACTOR}; got {tiles.shape}")
    blocks = tiles.reshape(n, bands, height // FACTOR, FACTOR, width // FACTOR, FACTOR).astype(np.float32)
    reflectance = np.moveaxis(blocks.mean(axis=(3, 5)) / 10_000, 1, -1)  # (N, h, w, 13), S2_BANDS = its order
    coarse = _detector().get_cloud_masks(reflectance).astype(bool)  # (N, h, w)
    masks = coarse.repeat(FACTOR, axis=1).repeat(FACTOR, axis=2)
    return masks & (tiles != 0).any(axis=1)


def cloud_shares(tiles: np.ndarray) -> np.ndarray:
    """(N,) share of each tile's pixels that are cloud."""
    return cloud_masks(tiles).reshape(len(tiles), -1).mean(axis=1)
