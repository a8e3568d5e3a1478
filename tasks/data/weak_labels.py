"""Per-pixel land-cover labels from the multispectral bands alone: the MS imagery as a pixel-level teacher.

Spectral indices separate a few surfaces well on Sentinel-2 reflectance where RGB alone confuses
them (docs/methods.md §B): open water absorbs NIR and SWIR, vegetation reflects NIR far above red,
built-up and bare ground reflect SWIR above NIR. Each rule below votes for one surface; a pixel
gets a label only when exactly one rule claims it with margin, and the ignore value otherwise
(uncertain or disputed pixels teach the detector nothing rather than something wrong).

    water      NDWI  = (G - NIR) / (G + NIR)   and MNDWI = (G - SWIR1) / (G + SWIR1) both above their thresholds
    forest     NDVI  = (NIR - R) / (NIR + R)   above ndvi_dense (dense canopy)
    grass      NDVI  between ndvi_low and ndvi_dense (low vegetation: grass, crops in growth)
    concrete   NDBI  = (SWIR1 - NIR) / (SWIR1 + NIR) above ndbi_min, BSI not above bsi_min, NDVI below ndvi_bare
    soil       BSI   = ((SWIR1 + R) - (NIR + B)) / ((SWIR1 + R) + (NIR + B)) above bsi_min, NDVI below ndvi_bare

Pixels within `margin` of a threshold count as uncertain. Reflectance is the L1C digital number
/ 10000; saturated (65535) and no-data (0) pixels are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ms2rgb.models.bands import S2_BANDS
from ms2rgb.tasks.data.classes import MASK_NODATA, SURFACE_NAMES

# The surfaces spectral indices can tell apart, in the order of SURFACE_NAMES they map to.
WEAK_SURFACES: tuple[str, ...] = ("water", "forest", "grass", "concrete", "soil")


@dataclass(frozen=True)
class IndexThresholds:
    """Thresholds of the index rules (params.yaml: weak_labels)."""

    ndwi_min: float  # water: NDWI above this ...
    mndwi_min: float  # ... and MNDWI above this
    ndvi_dense: float  # forest above, grass below
    ndvi_low: float  # grass above
    ndvi_bare: float  # built-up and soil below
    ndbi_min: float  # built-up above
    bsi_min: float  # soil above (built-up: not above)
    margin: float  # a pixel this close to a threshold it is judged by is uncertain


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(a - b) / (a + b), 0 where both are 0."""
    total = a + b
    return np.divide(a - b, total, out=np.zeros_like(total), where=total > 0)


def spectral_indices(ms: np.ndarray) -> dict[str, np.ndarray]:
    """NDWI, MNDWI, NDVI, NDBI and BSI of a (13, H, W) tile in S2_BANDS order (float32 each)."""
    band = {name: ms[S2_BANDS.index(name)].astype(np.float32) / 10_000 for name in ("B02", "B03", "B04", "B08", "B11")}
    blue, green, red, nir, swir = (band[b] for b in ("B02", "B03", "B04", "B08", "B11"))
    return {
        "ndwi": _ratio(green, nir),
        "mndwi": _ratio(green, swir),
        "ndvi": _ratio(nir, red),
        "ndbi": _ratio(swir, nir),
        "bsi": _ratio(swir + red, nir + blue),
    }


def _above(value: np.ndarray, threshold: float, margin: float) -> tuple[np.ndarray, np.ndarray]:
    """(clearly above, clearly below) `threshold`; the band of width 2*margin around it is neither."""
    return value > threshold + margin, value < threshold - margin


def weak_labels(ms: np.ndarray, cfg: IndexThresholds, cloudy: np.ndarray | None = None) -> np.ndarray:
    """(H, W) uint8 surface ids (SURFACE_NAMES) of a (13, H, W) uint16 L1C tile; MASK_NODATA where no
    rule claims the pixel with margin, where rules disagree, where the pixel is no-data or saturated,
    and where `cloudy` (H, W) is True (a cloud's indices say nothing of the ground below)."""
    idx = spectral_indices(ms)
    m = cfg.margin
    ndwi_hi, _ = _above(idx["ndwi"], cfg.ndwi_min, m)
    mndwi_hi, _ = _above(idx["mndwi"], cfg.mndwi_min, m)
    dense, not_dense = _above(idx["ndvi"], cfg.ndvi_dense, m)
    green, _ = _above(idx["ndvi"], cfg.ndvi_low, m)
    _, bare = _above(idx["ndvi"], cfg.ndvi_bare, m)
    built, _ = _above(idx["ndbi"], cfg.ndbi_min, m)
    soil_hi, soil_lo = _above(idx["bsi"], cfg.bsi_min, m)
    votes = {
        "water": ndwi_hi & mndwi_hi,
        "forest": dense,
        "grass": green & not_dense,
        "concrete": built & soil_lo & bare,
        "soil": soil_hi & bare,
    }
    claims = np.stack([votes[s] for s in WEAK_SURFACES])  # (5, H, W)
    labels = np.full(ms.shape[1:], MASK_NODATA, dtype=np.uint8)
    single = claims.sum(0) == 1
    ids = np.array([SURFACE_NAMES.index(s) for s in WEAK_SURFACES], dtype=np.uint8)
    labels[single] = ids[claims.argmax(0)[single]]
    invalid = (ms == 0).all(0) | (ms == 65535).any(0)
    if cloudy is not None:
        invalid |= cloudy
    labels[invalid] = MASK_NODATA
    return labels
