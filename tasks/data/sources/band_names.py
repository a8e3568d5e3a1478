"""Which Sentinel-2 band a file or a name holds: "B8A", "B02", "b2", "T33UUP_..._B02_10m.jp2"."""

from __future__ import annotations

import re
from pathlib import PurePath

from ms2rgb.models.bands import S2_BANDS

RASTER_SUFFIXES = (".jp2", ".tif", ".tiff")
# A band token standing alone in a name: "B8A", "B02", "b2" (not the "B" inside "T33UUB").
BAND_TOKEN = re.compile(r"(?<![A-Za-z0-9])B(8A|\d{1,2})(?![A-Za-z0-9])", re.IGNORECASE)


def band_name(token: str) -> str | None:
    """Canonical S2 name for "B2", "b02", "B8a", ... or None if it is not a Sentinel-2 band."""
    match = BAND_TOKEN.fullmatch(token.strip())
    if match is None:
        return None
    num = match.group(1).upper()
    name = "B8A" if num == "8A" else f"B{int(num):02d}"
    return name if name in S2_BANDS else None


def band_from_filename(path: PurePath) -> str | None:
    """The band a per-band file holds, from the last band token in its name (None if there is none)."""
    tokens = BAND_TOKEN.findall(path.stem)
    return band_name(f"B{tokens[-1]}") if tokens else None
