"""Drawing one synthetic location in memory: its surface layout and 13-band reflectance.

Pure numpy/torch (no raster I/O): `tasks/synth.py` writes the results as GeoTIFFs, and
`bench/rgb_ambiguity_sweep.py` uses it directly, also on GPU hosts without GDAL.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from tasks.config import require_range
from tasks.errors import ParamsError
from tasks.manifest import SPLITS
from tasks.spectra import surface_texture
from tasks.synth_layouts import LAYOUTS

TILE = 64  # pixels; equals tasks.geotiff.TILE_SIZE (kept here so this module needs no GDAL)


@dataclass(frozen=True)
class SynthConfig:
    seed: int = 0                      # everything below is drawn from this seed
    rgb_ambiguity: float = 0.3         # 0: RGB separates all surfaces; 1: confusable groups identical in RGB
    per_class: dict[str, int] = field(default_factory=lambda: {"ms_train": 60, "test": 30})  # locations
    illumination: float = 0.15         # per-tile brightness factor drawn from 1 +- this
    spectral_jitter: float = 0.05      # per-tile, per-surface, per-band relative spectrum change
    texture: float = 0.08              # amplitude of smooth within-surface texture
    noise: float = 0.02                # relative per-pixel sensor noise
    crs: str = "EPSG:32633"            # UTM zone 33N, as for much of EuroSAT

    def check(self, section: str) -> None:
        """Raise ParamsError for values that cannot make a data set."""
        require_range(f"{section}.rgb_ambiguity", self.rgb_ambiguity, 0.0, 1.0)
        for key in ("illumination", "spectral_jitter", "texture", "noise"):
            require_range(f"{section}.{key}", getattr(self, key), 0.0, 0.5)
        for split, count in self.per_class.items():
            if split not in SPLITS:
                raise ParamsError(f"{section}.per_class.{split}", count, f"valid splits are {list(SPLITS)}")
            if not isinstance(count, int) or count < 0:
                raise ParamsError(f"{section}.per_class.{split}", count, "use a whole number >= 0")


def _noise_field(rng: np.random.Generator, cells: int) -> np.ndarray:
    """(64, 64) smooth unit noise with `cells` x `cells` degrees of freedom."""
    coarse = torch.from_numpy(rng.normal(0, 1, (1, 1, cells, cells)).astype(np.float32))
    field = F.interpolate(coarse, size=(TILE, TILE), mode="bilinear", align_corners=False)
    return field[0, 0].numpy()


def render_location(rng: np.random.Generator, scene_class: str, spectra: np.ndarray,
                    cfg: SynthConfig) -> tuple[np.ndarray, np.ndarray]:
    """Draw one location: (13, 64, 64) uint16 MS reflectance and its (64, 64) surface mask."""
    mask = LAYOUTS[scene_class](rng, TILE)
    jitter = rng.normal(1.0, cfg.spectral_jitter, spectra.shape).astype(np.float32)
    image = (spectra * jitter)[mask].transpose(2, 0, 1)  # (13, H, W)
    image = image * (1 + cfg.texture * _noise_field(rng, 8))  # broad, surface-independent shading
    image = image * (1 + surface_texture()[mask] * _noise_field(rng, 32))  # surface roughness
    image = image * rng.uniform(1 - cfg.illumination, 1 + cfg.illumination)
    image[:2] += rng.uniform(0, 150)  # haze lifts the blue/aerosol bands
    image = image + rng.normal(0, 1, image.shape) * cfg.noise * image
    return np.clip(image, 1, 20000).astype(np.uint16), mask
