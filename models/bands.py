"""Sentinel-2 band names and band-keyed normalisation, shared by every model (docs/design.md, data model).

Statistics are keyed by band name so the MS teacher (13 bands) and the RGB student
(B04/B03/B02) pick their rows from one table and never disagree on scaling.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

# Sentinel-2 L1C order used everywhere in ms2rgb (note: EuroSAT's own tif order puts B8A last).
S2_BANDS: tuple[str, ...] = (
    "B01",
    "B02",
    "B03",
    "B04",
    "B05",
    "B06",
    "B07",
    "B08",
    "B8A",
    "B09",
    "B10",
    "B11",
    "B12",
)
RGB_BANDS: tuple[str, ...] = ("B04", "B03", "B02")

# Mean/std of real EuroSAT MS tiles (uint16 reflectance x10000), as published in torchgeo's
# EuroSAT datamodule, re-keyed by band name.
BAND_MEAN: dict[str, float] = {
    "B01": 1354.41,
    "B02": 1118.24,
    "B03": 1042.93,
    "B04": 947.63,
    "B05": 1199.47,
    "B06": 1999.79,
    "B07": 2369.22,
    "B08": 2296.83,
    "B8A": 2594.14,
    "B09": 732.08,
    "B10": 12.11,
    "B11": 1819.01,
    "B12": 1118.92,
}
BAND_STD: dict[str, float] = {
    "B01": 245.72,
    "B02": 333.01,
    "B03": 395.09,
    "B04": 593.75,
    "B05": 566.42,
    "B06": 861.18,
    "B07": 1086.63,
    "B08": 1117.98,
    "B8A": 1231.59,
    "B09": 404.92,
    "B10": 4.78,
    "B11": 1002.59,
    "B12": 761.30,
}

# 8-bit RGB tiles are rendered as clip(reflectance / RGB_REFLECTANCE_MAX, 0, 1) * 255
# (tasks/data/render.py). Models undo that stretch so RGB inputs share the reflectance table.
RGB_REFLECTANCE_MAX = 2750.0


class BandMismatchError(ValueError):
    """Input channels do not match the bands a model was built for."""


def check_bands(bands: Sequence[str]) -> tuple[str, ...]:
    """Return bands as a tuple, raising on names outside the Sentinel-2 table."""
    unknown = [b for b in bands if b not in BAND_MEAN]
    if unknown:
        raise BandMismatchError(f"unknown band name(s) {unknown}; valid names are {list(S2_BANDS)}")
    return tuple(bands)


class BandNormalize(nn.Module):
    """z-score each channel with the statistics of the band it carries.

    ``from_8bit`` marks inputs that are 8-bit RGB renders (0..255): they are mapped back
    to reflectance first, so a student and a teacher see the same units.
    """

    mean: torch.Tensor  # buffers, registered in __init__
    std: torch.Tensor

    def __init__(self, bands: Sequence[str], from_8bit: bool = False) -> None:
        super().__init__()
        self.bands = check_bands(bands)
        self.from_8bit = from_8bit
        mean = torch.tensor([BAND_MEAN[b] for b in self.bands]).view(1, -1, 1, 1)
        std = torch.tensor([BAND_STD[b] for b in self.bands]).view(1, -1, 1, 1)
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != len(self.bands):
            raise BandMismatchError(
                f"expected input (B, {len(self.bands)}, H, W) for bands {list(self.bands)}, "
                f"got shape {tuple(x.shape)}; pass tiles with exactly these bands in this order"
            )
        x = x.float()
        if self.from_8bit:
            x = x / 255.0 * RGB_REFLECTANCE_MAX
        return (x - self.mean) / self.std
