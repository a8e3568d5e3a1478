"""A Sentinel-2 product's metadata (MTD_MSIL1C.xml / MTD_MSIL2A.xml): level, baseline and radiometry.

Tags are matched by local name, whatever the namespace (ESA's change between PSD versions):
- level: PROCESSING_LEVEL ("Level-1C") or PRODUCT_TYPE ("S2MSI1C"); else the file name says;
- PROCESSING_BASELINE ("04.00");
- quantification: QUANTIFICATION_VALUE (L1C) or BOA_QUANTIFICATION_VALUE (L2A);
- offsets: RADIO_ADD_OFFSET (L1C) or BOA_ADD_OFFSET (L2A), one per band_id 0..12 in the order
  B01 ... B08, B8A, B09 ... B12 (absent before baseline 04.00: no offset).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterator

from ms2rgb.models.bands import S2_BANDS
from ms2rgb.tasks.data.sources.radiometry import Radiometry
from ms2rgb.tasks.errors import RasterError

LEVELS = {"LEVEL-1C": "L1C", "S2MSI1C": "L1C", "LEVEL-2A": "L2A", "S2MSI2A": "L2A", "LEVEL-2AP": "L2A"}
_TAGS = {  # level -> (quantification tag, offset tag)
    "L1C": ("QUANTIFICATION_VALUE", "RADIO_ADD_OFFSET"),
    "L2A": ("BOA_QUANTIFICATION_VALUE", "BOA_ADD_OFFSET"),
}
_BAD = "re-download the product; its metadata file is damaged"


def product_level(value: str, where: object, what: str) -> str:
    """ "L1C" or "L2A" for a level or product type; anything else is refused."""
    level = LEVELS.get(value.strip().upper())
    if level is None:
        raise RasterError(
            where,
            f"is a {value.strip()!r} product ({what}), not Level-1C or Level-2A",
            "ingest the Level-1C (MSIL1C) or Level-2A (MSIL2A) product of the scene",
        )
    return level


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _all(root: ET.Element, tag: str) -> Iterator[ET.Element]:
    return (e for e in root.iter() if _local(e.tag) == tag)


def _text(root: ET.Element, tag: str) -> str | None:
    found = next(_all(root, tag), None)
    return found.text.strip() if found is not None and found.text else None


def _number(text: str | None, where: str, tag: str) -> float:
    try:
        return float(text or "")
    except ValueError:
        raise RasterError(where, f"{tag}={text!r} is not a number", _BAD) from None


def _offsets(root: ET.Element, tag: str, where: str) -> dict[str, float]:
    offsets = dict.fromkeys(S2_BANDS, 0.0)
    for element in _all(root, tag):
        band_id = element.get("band_id", "")
        if not band_id.isdigit() or int(band_id) >= len(S2_BANDS):
            raise RasterError(where, f"{tag} has band_id={band_id!r}, expected 0..{len(S2_BANDS) - 1}", _BAD)
        offsets[S2_BANDS[int(band_id)]] = _number(element.text, where, tag)
    return offsets


def parse_metadata(xml: bytes, where: str, name_level: str | None) -> Radiometry:
    """The product's level, baseline and radiometry. `where` names the file in errors; `name_level`
    is the level its file name gives (MTD_MSIL1C.xml: "L1C"), used when no tag says."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise RasterError(where, f"is not readable XML ({exc})", _BAD) from exc
    level = name_level
    for tag in ("PROCESSING_LEVEL", "PRODUCT_TYPE"):
        value = _text(root, tag)
        if value is not None:
            level = product_level(value, where, tag)
            break
    if level is None:
        raise RasterError(where, "says neither PROCESSING_LEVEL nor PRODUCT_TYPE", _BAD)
    quant_tag, offset_tag = _TAGS[level]
    quant = _text(root, quant_tag)
    quantification = _number(quant, where, quant_tag) if quant is not None else 10000.0
    if quantification <= 0:
        raise RasterError(where, f"{quant_tag}={quant!r} must be positive", _BAD)
    return Radiometry(
        offsets=_offsets(root, offset_tag, where),
        quantification=quantification,
        source="metadata",
        baseline=_text(root, "PROCESSING_BASELINE"),
        level=level,
        origin=where,
    )
