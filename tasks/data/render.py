"""The data model's RGB rendering, in pure numpy (no raster I/O), so GPU hosts and tools can use it."""

from __future__ import annotations

import numpy as np

from ms2rgb.models.bands import RGB_BANDS, RGB_REFLECTANCE_MAX, S2_BANDS


def render_rgb(ms: np.ndarray, bands: tuple[str, ...] = S2_BANDS) -> np.ndarray:
    """8-bit true colour from reflectance: B04/B03/B02, linear 0..RGB_REFLECTANCE_MAX -> 0..255.

    This fixed linear stretch with clipping imitates the look of EuroSAT's RGB jpgs; a fixed
    (not per-tile) stretch keeps brightness comparable between tiles, as in EuroSAT.
    """
    idx = [bands.index(b) for b in RGB_BANDS]
    rgb = ms[idx].astype(np.float32) / RGB_REFLECTANCE_MAX
    return (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
