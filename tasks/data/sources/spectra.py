"""Top-of-atmosphere reflectance (x10000) of the surfaces the synthetic scenes are made of.

Values follow the shapes of real Sentinel-2 L1C spectra: vegetation has low red, a red edge
(B05-B07) and a NIR plateau (B08/B8A); water absorbs in NIR/SWIR (B08 ~ 300, like real
SeaLake tiles); soil and built-up surfaces are bright in SWIR (B11/B12); B01/B02 carry an
atmospheric (haze) offset and B10 (cirrus) stays near 12, as on real tiles.
"""

from __future__ import annotations

import numpy as np

from ms2rgb.tasks.data.classes import SURFACE_NAMES

#           B01   B02   B03   B04   B05   B06   B07   B08   B8A   B09  B10   B11   B12
_SPECTRA: dict[str, list[float]] = {
    "crop": [1250, 950, 900, 600, 1100, 2600, 3200, 3400, 3500, 1000, 12, 1900, 1000],
    "grass": [1280, 1000, 1000, 800, 1250, 2200, 2600, 2800, 2900, 900, 12, 2100, 1200],
    "herb": [1300, 1020, 980, 850, 1350, 1900, 2200, 2350, 2450, 800, 12, 2500, 1600],
    "forest": [1200, 880, 780, 480, 850, 1900, 2450, 2600, 2750, 850, 12, 1350, 650],
    "soil": [1400, 1200, 1350, 1600, 1800, 2000, 2150, 2250, 2350, 800, 14, 3000, 2500],
    "water": [1350, 1050, 800, 550, 480, 400, 370, 315, 290, 120, 8, 160, 110],
    "asphalt": [1350, 1150, 1120, 1150, 1180, 1220, 1260, 1300, 1320, 520, 12, 1650, 1500],
    "concrete": [1450, 1250, 1280, 1300, 1400, 1550, 1650, 1750, 1800, 650, 13, 2600, 2400],
    "roof": [1400, 1080, 1050, 1500, 1650, 1750, 1800, 1850, 1900, 650, 13, 2300, 2000],
}

# Fine-grained texture amplitude (relative): canopy is rough, open water smooth. Members of a
# confusable group share one value, so texture never gives their identity away.
SURFACE_TEXTURE: dict[str, float] = {
    "crop": 0.06,
    "grass": 0.06,
    "herb": 0.06,
    "forest": 0.18,
    "soil": 0.05,
    "water": 0.015,
    "asphalt": 0.04,
    "concrete": 0.04,
    "roof": 0.06,
}

# Surfaces that real RGB barely separates; rgb_ambiguity pulls their visible bands together.
CONFUSABLE_GROUPS: tuple[tuple[str, ...], ...] = (("crop", "grass", "herb"), ("asphalt", "concrete"))
VISIBLE_BAND_INDEX = (1, 2, 3)  # B02, B03, B04: the bands an RGB render sees


def surface_texture() -> np.ndarray:
    """(n_surfaces,) fine-texture amplitude in SURFACE_NAMES order."""
    return np.array([SURFACE_TEXTURE[name] for name in SURFACE_NAMES], dtype=np.float32)


def surface_spectra(rgb_ambiguity: float) -> np.ndarray:
    """(n_surfaces, 13) spectra with confusable groups' visible bands blended by rgb_ambiguity.

    0 keeps the spectra as they are; 1 makes each group identical in B02-B04, so only the
    red-edge, NIR and SWIR bands tell its members apart.
    """
    table = np.array([_SPECTRA[name] for name in SURFACE_NAMES], dtype=np.float32)
    vis = list(VISIBLE_BAND_INDEX)
    for group in CONFUSABLE_GROUPS:
        rows = [SURFACE_NAMES.index(name) for name in group]
        group_mean = table[np.ix_(rows, vis)].mean(axis=0)
        for row in rows:
            table[row, vis] = (1 - rgb_ambiguity) * table[row, vis] + rgb_ambiguity * group_mean
    return table
