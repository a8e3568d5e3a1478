"""A Sentinel-2 scene as a STAC item (a local JSON file or an http(s) URL): its 13 band assets.

Assets are picked by band: the asset key (``B02``, or the common name ``blue`` as Earth Search
writes it), else the one name in the asset's ``eo:bands`` (or STAC 1.1 ``bands``); a key match wins,
so ``blue`` is taken over a ``blue-jp2`` copy. Hrefs are resolved against the item's own location
(its file, or its URL) and read through GDAL: a local file, or a URL rasterio opens through
/vsicurl/ (tasks/data/sources/remote.py), nothing copied.

Radiometry (reflectance = DN * scale + offset), first rule that applies:
1. every band asset states ``raster:bands`` scale and offset: offset/scale DN, quantification 1/scale;
2. else the item's ``s2:processing_baseline``: from 04.00 on ESA adds -1000 to every DN
   (RADIO_ADD_OFFSET / BOA_ADD_OFFSET), before it none; source "baseline" in ingest.json;
3. else nothing: the offset given for bare files applies (scene_inputs.py notes why).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pystac
from pystac.utils import make_absolute_href

from ms2rgb.models.bands import S2_BANDS
from ms2rgb.tasks.data.sources.band_names import band_name
from ms2rgb.tasks.data.sources.radiometry import BASELINE_OFFSET, Radiometry, baseline_offset
from ms2rgb.tasks.data.sources.remote import fetch_text, is_url
from ms2rgb.tasks.data.sources.s2_metadata import product_level
from ms2rgb.tasks.data.sources.s2_product import Product, check_bands, scene_name
from ms2rgb.tasks.errors import RasterError

# STAC's eo common names of the Sentinel-2 bands (Earth Search uses them as asset keys).
COMMON_NAMES = {
    "coastal": "B01",
    "blue": "B02",
    "green": "B03",
    "red": "B04",
    "rededge1": "B05",
    "rededge2": "B06",
    "rededge3": "B07",
    "nir": "B08",
    "nir08": "B8A",
    "nir09": "B09",
    "cirrus": "B10",
    "swir16": "B11",
    "swir22": "B12",
}


def asset_band(name: str) -> str | None:
    """The band an asset key or eo:bands name stands for: "B02", "b2" or "blue" -> "B02"."""
    return band_name(name) or COMMON_NAMES.get(name.strip().lower())


def is_stac_item_file(path: Path) -> bool:
    """A JSON file holding a GeoJSON Feature with assets (what a STAC API search returns per scene)."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(raw, dict) and raw.get("type") == "Feature" and isinstance(raw.get("assets"), dict)


def read_stac_item(href: str) -> Product:
    """The item's band files and radiometry; `href` is a local path or an http(s) URL."""
    item = _load_item(href)
    kind = item.properties.get("s2:product_type")
    level = product_level(str(kind), href, "s2:product_type") if kind else None
    assets = _band_assets(item)
    check_bands(href, set(assets), level, "the item's asset keys and eo:bands names")
    hrefs = {b: assets[b].get_absolute_href() or assets[b].href for b in S2_BANDS}
    name = item.id or scene_name(Path(href).name)
    stated = _stated_radiometry(item, assets, href, level)
    return Product(href, name, hrefs, stated or _baseline_radiometry(item, href, level))


def _load_item(href: str) -> pystac.Item:
    """The item at `href`; one RasterError naming it when it cannot be fetched or is no STAC item."""
    fix = "pass one STAC item's JSON (a Feature with assets), as a STAC API returns it for one scene"
    try:
        text = fetch_text(href) if is_url(href) else Path(href).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RasterError(href, f"cannot be read ({exc})", fix) from exc
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise RasterError(href, f"is not JSON ({exc})", fix) from exc
    if not (isinstance(raw, dict) and raw.get("type") == "Feature" and isinstance(raw.get("assets"), dict)):
        kind = raw.get("type") if isinstance(raw, dict) else type(raw).__name__
        raise RasterError(href, f"is not a STAC item (its JSON is a {kind!r}, not a Feature with assets)", fix)
    # The item's own location, so that relative asset hrefs resolve against its URL or folder.
    location = href if is_url(href) else make_absolute_href(href)
    try:
        return pystac.Item.from_dict(raw, href=location, migrate=True, preserve_dict=False)
    except (ValueError, KeyError, TypeError, pystac.STACError, pystac.STACTypeError) as exc:
        raise RasterError(href, f"is not a readable STAC item ({exc})", fix) from exc


def _eo_names(asset: pystac.Asset) -> list[str]:
    bands = asset.extra_fields.get("eo:bands") or asset.extra_fields.get("bands") or []
    return [str(b.get("name", "")) for b in bands if isinstance(b, dict)]


def _band_assets(item: pystac.Item) -> dict[str, pystac.Asset]:
    by_key: dict[str, pystac.Asset] = {}
    by_eo: dict[str, pystac.Asset] = {}
    for key, asset in item.assets.items():
        if band := asset_band(key):
            by_key.setdefault(band, asset)
        names = _eo_names(asset)  # a 3-band "visual" asset names no single band
        if len(names) == 1 and (band := asset_band(names[0])):
            by_eo.setdefault(band, asset)
    return by_eo | by_key


def _scale_offset(asset: pystac.Asset) -> tuple[float, float] | None:
    raster: Any = asset.extra_fields.get("raster:bands") or asset.extra_fields.get("bands") or []
    entry = raster[0] if len(raster) == 1 and isinstance(raster[0], dict) else {}
    return (float(entry["scale"]), float(entry.get("offset", 0.0))) if "scale" in entry else None


def _stated_radiometry(
    item: pystac.Item, assets: dict[str, pystac.Asset], where: str, level: str | None
) -> Radiometry | None:
    """Rule 1: the assets' raster:bands, when every band asset states them; else None."""
    stated = {band: _scale_offset(assets[band]) for band in S2_BANDS}
    if any(v is None for v in stated.values()):
        return None
    scales = {scale for scale, _ in filter(None, stated.values())}
    if len(scales) != 1 or min(scales) <= 0:
        raise RasterError(
            where, f"its band assets give raster:bands scales {sorted(scales)}", "give one positive scale"
        )
    scale = scales.pop()
    # Offsets are in reflectance units (-0.1); in DN they are -1000 (rounded: 0.1/0.0001 is not exact).
    offsets = {band: round(v[1] / scale, 6) for band, v in stated.items() if v is not None}
    baseline = item.properties.get("s2:processing_baseline")
    return Radiometry(
        offsets,
        round(1.0 / scale, 6),
        "metadata",
        str(baseline) if baseline else None,
        level,
        f"{where} (raster:bands)",
    )


def _baseline_radiometry(item: pystac.Item, where: str, level: str | None) -> Radiometry | None:
    """Rule 2: ESA's offset for the item's s2:processing_baseline; None when the item states none."""
    baseline = item.properties.get("s2:processing_baseline")
    if baseline is None or str(baseline).strip() == "":
        return None
    offset = baseline_offset(str(baseline), where, "s2:processing_baseline")
    note = f"no raster:bands offsets; s2:processing_baseline {baseline} gives {offset:g}"
    if offset:
        note += f" (ESA's offset from baseline {BASELINE_OFFSET[0]})"
    return Radiometry(
        dict.fromkeys(S2_BANDS, offset),
        source="baseline",
        baseline=str(baseline),
        level=level,
        origin=f"{where} (s2:processing_baseline)",
        notes=(note,),
    )
