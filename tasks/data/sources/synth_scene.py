"""Drawing one synthetic location in memory: its surface layout and 13-band reflectance.

Pure numpy/torch (no raster I/O): `tasks/data/sources/synth.py` writes the results as GeoTIFFs, and
`bench/rgb_ambiguity_sweep.py` uses it directly, also on GPU hosts without GDAL.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ms2rgb.tasks.config import SynthConfig
from ms2rgb.tasks.data.sources.spectra import surface_texture
from ms2rgb.tasks.data.sources.synth_layouts import LAYOUTS

TILE = 64  # pixels; equals tasks.geotiff.TILE_SIZE (kept here so this module needs no GDAL)


def _noise_field(rng: np.random.Generator, cells: int) -> np.ndarray:
    """(64, 64) smooth unit noise with `cells` x `cells` degrees of freedom."""
    coarse = torch.from_numpy(rng.normal(0, 1, (1, 1, cells, cells)).astype(np.float32))
    field = F.interpolate(coarse, size=(TILE, TILE), mode="bilinear", align_corners=False)
    return field[0, 0].numpy()


def render_location(
    rng: np.random.Generator, scene_class: str, spectra: np.ndarray, cfg: SynthConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one location: (13, 64, 64) uint16 MS reflectance and its (64, 64) surface mask."""
    mask = LAYOUTS[scene_class](rng, TILE)
    jitter = rng.normal(1.0, cfg.spectral_jitter, spectra.shape).astype(np.float32)
    image: np.ndarray = (spectra * jitter)[mask].transpose(2, 0, 1)  # (13, H, W)
    image = image * (1 + cfg.texture * _noise_field(rng, 8))  # broad, surface-independent shading
    image = image * (1 + surface_texture()[mask] * _noise_field(rng, 32))  # surface roughness
    image = image * rng.uniform(1 - cfg.illumination, 1 + cfg.illumination)
    image[:2] += rng.uniform(0, 150)  # haze lifts the blue/aerosol bands
    image = image + rng.normal(0, 1, image.shape) * cfg.noise * image
    return np.clip(image, 1, 20000).astype(np.uint16), mask
