"""Per-tile facts for the validate stage: does each manifest file exist, decode, match its checksum,
and carry the bands, dtype, values, CRS and mask the manifest promises.

Nothing here judges a tile: bad files become rows with False/NA facts, and the expectations in
tasks/expectations.py decide what fails. So one corrupt tile never hides the other problems.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import rasterio

from ms2rgb.tasks.data.classes import MASK_NODATA, SURFACE_NAMES
from ms2rgb.tasks.data.geotiff import read_tile, sha256_of

PROGRESS_EVERY = 500  # tiles between progress lines

# column -> pandas dtype of the frame compute_tile_stats returns (nullable: unreadable tiles give NA).
STATS_COLUMNS: dict[str, str] = {
    "id": "string",
    "file_exists": "bool",
    "readable": "bool",
    "error": "string",  # why the tile could not be read, else <NA>
    "sha_matches": "bool",  # False too when the manifest has no checksum
    "band_count": "Int64",
    "dtype": "string",
    "height": "Int64",
    "width": "Int64",
    "nan_share": "float64",  # share of values (all bands) that are NaN
    "nodata_share": "float64",  # share of pixels that are 0 in every band or NaN in any band
    "band_min": "float64",  # smallest per-band minimum
    "band_max": "float64",  # smallest per-band maximum: 0 means some band is entirely 0
    "max_value": "float64",  # largest value in any band
    "has_crs": "boolean",  # <NA> when unreadable, so a corrupt file is reported once, as unreadable
    "crs": "string",  # CRS of the file as "EPSG:n" or WKT
    "mask_ok": "bool",  # mask exists, decodes, has valid values and the tile's shape (True if no mask)
}


def _array_stats(array: np.ndarray) -> dict[str, Any]:
    """Value facts of a (C, H, W) tile; NaN-aware so float tiles with holes still get numbers."""
    values = array.astype(np.float64, copy=False)
    nan = np.isnan(values)  # (C, H, W)
    pixels = array.shape[1] * array.shape[2]
    nodata = (np.nan_to_num(values, nan=0.0) == 0).all(axis=0) | nan.any(axis=0)  # (H, W)
    out: dict[str, Any] = {
        "nan_share": float(nan.mean()) if values.size else 0.0,
        "nodata_share": float(nodata.sum() / pixels) if pixels else 1.0,
    }
    if nan.all() or values.size == 0:  # nothing to take a min/max of
        return out | {"band_min": np.nan, "band_max": np.nan, "max_value": np.nan}
    flat = values.reshape(values.shape[0], -1)  # (C, H*W)
    with np.errstate(all="ignore"):  # all-NaN bands warn; their NaN is skipped by the outer nanmin
        per_min, per_max = np.nanmin(flat, axis=1), np.nanmax(flat, axis=1)
    return out | {
        "band_min": float(np.nanmin(per_min)),
        "band_max": float(np.nanmin(per_max)),
        "max_value": float(np.nanmax(per_max)),
    }


def _raster_stats(path: Path) -> dict[str, Any]:
    """Open and fully decode one tile; any decoding error is recorded, not raised."""
    try:
        with rasterio.open(path) as src:
            array = src.read()  # (C, H, W); a truncated file usually fails here, not at open
            crs = src.crs
    # Why so broad: GDAL reports corrupt data through several exception types (RasterioIOError,
    # CPLE_* errors, ValueError from the driver); each one means "unreadable" to the validator.
    except Exception as exc:
        return {"readable": False, "error": f"{type(exc).__name__}: {exc}"}
    crs_text = crs.to_string() if crs is not None else None
    return {
        "readable": True,
        "band_count": array.shape[0],
        "dtype": array.dtype.name,
        "height": array.shape[1],
        "width": array.shape[2],
        "has_crs": bool(crs_text),
        "crs": crs_text or None,
        **_array_stats(array),
    }


def _mask_ok(mask_path: object, data_root: Path, shape: tuple[object, object]) -> bool:
    """True when there is no mask, or it decodes to one band of known surface values in the tile's shape."""
    if pd.isna(mask_path):
        return True
    try:
        mask = read_tile(data_root / str(mask_path), expect_bands=1, expect_dtype="uint8")
    except Exception:
        return False
    valid = (mask < len(SURFACE_NAMES)) | (mask == MASK_NODATA)
    same_shape = shape == (None, None) or tuple(mask.shape[1:]) == shape
    return bool(valid.all()) and same_shape


def tile_row(row: pd.Series, data_root: Path) -> dict[str, Any]:
    """Facts about one manifest row's tile and mask (see STATS_COLUMNS)."""
    path = data_root / str(row["path"])
    facts: dict[str, Any] = {"id": row["id"], "file_exists": path.is_file(), "readable": False, "sha_matches": False}
    if facts["file_exists"]:
        facts |= _raster_stats(path)
        expected = row["sha256"]
        facts["sha_matches"] = bool(pd.notna(expected) and sha256_of(path) == str(expected))
    else:
        facts["error"] = "file does not exist"
    shape = (facts.get("height"), facts.get("width"))
    facts["mask_ok"] = _mask_ok(row["mask_path"], data_root, shape)
    return facts


def compute_tile_stats(
    manifest: pd.DataFrame, data_root: Path, progress: Callable[[str], None] = print
) -> pd.DataFrame:
    """One row of STATS_COLUMNS per manifest row, in manifest order; never raises for a bad file."""
    rows = []
    total = len(manifest)
    for number, (_, row) in enumerate(manifest.iterrows(), start=1):
        rows.append(tile_row(row, data_root))
        if number % PROGRESS_EVERY == 0 or number == total:
            progress(f"tile stats: {number}/{total} tiles checked")
    frame = pd.DataFrame(rows, columns=list(STATS_COLUMNS))
    return frame.astype(STATS_COLUMNS)
