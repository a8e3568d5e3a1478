"""How a scene's digital numbers (DN) become the stored uint16 reflectance x10000.

ESA's processing baseline 04.00 (products from 25 January 2022 on) shifts every DN by an offset:
reflectance = (DN + offset) / quantification, with RADIO_ADD_OFFSET (L1C) or BOA_ADD_OFFSET (L2A)
= -1000 and QUANTIFICATION_VALUE = 10000. Stored without it, such a scene reads about 0.1 too
bright. A product brings both numbers in its metadata (tasks/data/sources/s2_metadata.py); a STAC
item without them its processing baseline (source "baseline": -1000 from 04.00 on, else 0); bare
band files take the offset from `ms2rgb data ingest --offset` or params `data.radiometric_offset`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from ms2rgb.models.bands import S2_BANDS
from ms2rgb.tasks.errors import Ms2rgbError, RasterError

STORED_SCALE = 10000.0  # the pool's uint16 tiles hold reflectance x10000
OFFSET_RANGE = (-10000, 0)  # ESA adds a negative offset (-1000); a positive one is a sign mistake
BASELINE_OFFSET = ("04.00", -1000.0)  # from this processing baseline on, ESA adds this offset to every DN
# metadata: stated by the product; baseline: ESA's rule for the baseline it states; param / option: given
Source = Literal["metadata", "baseline", "param", "option", "none"]


@dataclass(frozen=True)
class Radiometry:
    """stored = round((DN + offset[band]) * 10000 / quantification); DN 0 (no data) stays 0."""

    offsets: dict[str, float]  # band -> offset added to its DN (RADIO_ADD_OFFSET / BOA_ADD_OFFSET)
    quantification: float = STORED_SCALE  # DN per unit reflectance (QUANTIFICATION_VALUE)
    source: Source = "none"  # where the numbers came from
    baseline: str | None = None  # PROCESSING_BASELINE, e.g. "04.00", when the input says
    level: str | None = None  # "L1C" or "L2A", when the input says
    origin: str | None = None  # the file the numbers were read from
    notes: tuple[str, ...] = field(default=())  # e.g. an option that the metadata overrode

    def is_identity(self) -> bool:
        return self.quantification == STORED_SCALE and not any(self.offsets.values())

    def apply(self, band: str, dn: np.ndarray) -> np.ndarray:
        """One band's float32 DNs as float32 reflectance x10000 (not yet rounded)."""
        if self.is_identity():
            return dn
        out = (dn + np.float32(self.offsets.get(band, 0.0))) * np.float32(STORED_SCALE / self.quantification)
        # 0 marks no data in every tile of this project (validate counts it, ingestion skips it).
        # A valid dark pixel (deep water, shadow) that the offset takes to 0 or below is real ground,
        # so it keeps the smallest valid value instead of turning into a hole.
        out = np.maximum(out, np.float32(1.0))
        out[dn == 0] = 0.0
        return out

    def report(self) -> dict[str, Any]:
        """What was applied, for the scene's ingest.json."""
        return {
            "source": self.source,
            "offsets": {b: self.offsets.get(b, 0.0) for b in S2_BANDS},
            "quantification": self.quantification,
            "baseline": self.baseline,
            "level": self.level,
            "origin": self.origin,
            "notes": list(self.notes),
        }

    def describe(self) -> str:
        """One progress line: the offsets (one value when all bands share it) and where they came from."""
        values = sorted(set(self.offsets.values()) or {0.0})
        offset = f"{values[0]:g}" if len(values) == 1 else ", ".join(f"{b} {v:g}" for b, v in self.offsets.items())
        where = f" from {self.origin}" if self.origin else ""
        base = f", baseline {self.baseline}" if self.baseline else ""
        return f"offset {offset}, quantification {self.quantification:g} ({self.source}{where}{base})"


def given_offset(offset: float, source: Source, key: str) -> Radiometry:
    """The same offset on every band, as given by an option or a param named `key`; 0 from params is
    recorded as "none" (nothing was asked for)."""
    low, high = OFFSET_RANGE
    if not low <= offset <= high:
        raise Ms2rgbError(
            f"{key}={offset!r} is out of range: the offset is added to each DN and ESA's is negative "
            f"(RADIO_ADD_OFFSET=-1000 from processing baseline 04.00); give a value in [{low}, {high}]"
        )
    source = "none" if (offset == 0 and source == "param") else source
    return Radiometry(dict.fromkeys(S2_BANDS, float(offset)), source=source, origin=None if source == "none" else key)


def baseline_offset(baseline: str, where: object, key: str) -> float:
    """ESA's offset for a processing baseline ("05.09" -> -1000, "03.01" -> 0); `where` and `key`
    name the input and field in the error for a value that is not a baseline."""
    match = re.fullmatch(r"(\d{1,2})\.(\d{1,2})", baseline.strip())
    if match is None:
        raise RasterError(
            where,
            f"{key}={baseline!r} is not a processing baseline like '04.00'",
            "correct it, or state the offset in the band assets' raster:bands (scale 0.0001, offset -0.1)",
        )
    first = tuple(int(part) for part in BASELINE_OFFSET[0].split("."))
    return BASELINE_OFFSET[1] if (int(match[1]), int(match[2])) >= first else 0.0


NO_OFFSET = Radiometry(dict.fromkeys(S2_BANDS, 0.0))
