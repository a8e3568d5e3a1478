"""Per-tile facts for the validate stage: does each manifest file exist, decode, match its checksum,
and carry the bands, dtype, values, CRS and mask the manifest promises.

Nothing here judges a tile: bad files become rows with False/NA facts, and the expectations in
tasks/data/expectations.py decide what fails. So one corrupt tile never hides the other problems.

Decoding is most of the cost (two GDAL opens a tile), and the facts of a tile are a function of its
bytes and its mask's bytes alone. So a memo (`data/.memo/tile-facts.parquet`, not versioned: losing
it costs only time) keeps them by the two sha256 values, and validating the pool after a new scene
decodes only the new tiles. Every file is still hashed on every run, so a tile changed on disk is
never served from the memo.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import rasterio

from ms2rgb.tasks.data.atomic import write_atomic
from ms2rgb.tasks.data.classes import MASK_NODATA
from ms2rgb.tasks.data.geotiff import TILE_IO, read_tile, sha256_of

PROGRESS_EVERY = 500  # tiles between progress lines
L1C_SATURATED = 65535  # what Sentinel-2 L1C writes where a detector saturated
MEMO = Path("data") / ".memo" / "tile-facts.parquet"  # under the project root
MEMO_KEY = ["tile_sha256", "mask_sha256"]  # mask_sha256 is "" for a tile without mask

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
    "saturated_share": "float64",  # uint16 tiles: share of pixels at 65535 in any band (L1C saturation); else NaN
    "has_crs": "boolean",  # <NA> when unreadable, so a corrupt file is reported once, as unreadable
    "crs": "string",  # CRS of the file as "EPSG:n" or WKT
    "mask_ok": "bool",  # mask exists, decodes to one uint8 band in the tile's shape (True if no mask)
    # Judged against the legend by validation (the facts stay a function of the bytes, for the memo):
    "mask_max": "Int64",  # largest labelled value (not MASK_NODATA) of the mask; <NA> without one
    "ignore_share": "float64",  # share of the mask's pixels at MASK_NODATA; NaN without a mask
}


def _array_stats(array: np.ndarray) -> dict[str, Any]:
    """Value facts of a (C, H, W) tile; NaN-aware so float tiles with holes still get numbers."""
    values = array.astype(np.float64, copy=False)
    nan = np.isnan(values)  # (C, H, W)
    pixels = array.shape[1] * array.shape[2]
    nodata = (np.nan_to_num(values, nan=0.0) == 0).all(axis=0) | nan.any(axis=0)  # (H, W)
    saturated = (array == L1C_SATURATED).any(axis=0) if array.dtype == np.uint16 else None  # (H, W)
    out: dict[str, Any] = {
        "nan_share": float(nan.mean()) if values.size else 0.0,
        "nodata_share": float(nodata.sum() / pixels) if pixels else 1.0,
        "saturated_share": float(saturated.mean()) if saturated is not None and pixels else np.nan,
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


def _raster_stats(path: Path) -> tuple[dict[str, Any], np.ndarray | None]:
    """Open and fully decode one tile: its facts and its (C, H, W) array (None when unreadable).
    Any decoding error is recorded, not raised."""
    try:
        with rasterio.Env(**TILE_IO), rasterio.open(path) as src:
            array = src.read()  # (C, H, W); a truncated file usually fails here, not at open
            crs = src.crs
    # Why so broad: GDAL reports corrupt data through several exception types (RasterioIOError,
    # CPLE_* errors, ValueError from the driver); each one means "unreadable" to the validator.
    except Exception as exc:
        return {"readable": False, "error": f"{type(exc).__name__}: {exc}"}, None
    crs_text = crs.to_string() if crs is not None else None
    facts = {
        "readable": True,
        "band_count": array.shape[0],
        "dtype": array.dtype.name,
        "height": array.shape[1],
        "width": array.shape[2],
        "has_crs": bool(crs_text),
        "crs": crs_text or None,
        **_array_stats(array),
    }
    return facts, array


def _read_mask(mask_path: object, data_root: Path) -> np.ndarray | None:
    """The mask as decoded, or None when the row has none or it cannot be decoded."""
    if pd.isna(mask_path):
        return None
    try:
        return read_tile(data_root / str(mask_path))
    except Exception:
        return None


def _mask_ok(mask_path: object, mask: np.ndarray | None, shape: tuple[object, object]) -> bool:
    """True when there is no mask, or it decodes to one uint8 band in the tile's shape. Whether its
    values are classes of the legend is judged from `mask_max` (validation knows the legend)."""
    if pd.isna(mask_path):
        return True
    if mask is None or mask.shape[0] != 1 or mask.dtype != np.uint8:
        return False
    return shape == (None, None) or tuple(mask.shape[1:]) == shape


def ignore_share(mask: np.ndarray) -> float:
    """Share of a mask's pixels without label (MASK_NODATA). One definition for validation's
    `validate.max_ignore_share` check and for `ms2rgb data masks`, which drops what it would fail."""
    return float((mask == MASK_NODATA).mean())


def _mask_values(mask: np.ndarray | None) -> dict[str, Any]:
    """mask_max and ignore_share of a decoded mask (NA/NaN without one)."""
    if mask is None or mask.size == 0:
        return {"mask_max": pd.NA, "ignore_share": np.nan}
    labelled = mask[mask != MASK_NODATA]
    return {
        "mask_max": int(labelled.max()) if labelled.size else pd.NA,
        "ignore_share": ignore_share(mask),
    }


# Facts that depend on the row rather than on the bytes: never taken from the memo.
ROW_FACTS = ("id", "file_exists", "sha_matches")
Key = tuple[str, str]


@dataclass(frozen=True)
class Decoded:
    """One tile decoded once: what the cache stores and what validation judges."""

    facts: dict[str, Any]  # the content facts (STATS_COLUMNS but ROW_FACTS)
    tile: np.ndarray | None  # (C, H, W), None when unreadable
    mask: np.ndarray | None  # (1, H, W) as decoded, None without mask or when unreadable


def decode(path: Path, mask_path: object, data_root: Path) -> Decoded:
    """Read a tile and its mask; the facts that follow from their bytes, and the arrays."""
    facts, tile = _raster_stats(path)
    mask = _read_mask(mask_path, data_root)
    shape = (facts.get("height"), facts.get("width"))
    return Decoded(facts | {"mask_ok": _mask_ok(mask_path, mask, shape)} | _mask_values(mask), tile, mask)


def memo_key(path: Path, mask_path: object, data_root: Path) -> Key | None:
    """(tile sha256, mask sha256 or ""), None when the mask cannot be hashed."""
    mask_sha = _mask_sha(mask_path, data_root)
    return (sha256_of(path), mask_sha) if mask_sha is not None else None


def _mask_sha(mask_path: object, data_root: Path) -> str | None:
    """ "" without a mask, its sha256, or None when it cannot be read (then no memo for the tile)."""
    if pd.isna(mask_path):
        return ""
    try:
        return sha256_of(data_root / str(mask_path))
    except OSError:
        return None


def tile_row(row: pd.Series, data_root: Path, memo: dict[Key, dict[str, Any]]) -> tuple[dict[str, Any], Key | None]:
    """Facts about one manifest row's tile and mask (see STATS_COLUMNS), and its memo key (None: not
    memoisable). Content facts come from `memo` when its key is there."""
    path = data_root / str(row["path"])
    facts: dict[str, Any] = {"id": row["id"], "file_exists": path.is_file(), "readable": False, "sha_matches": False}
    if not facts["file_exists"]:
        mask = _read_mask(row["mask_path"], data_root)
        facts |= {"error": "file does not exist", "mask_ok": _mask_ok(row["mask_path"], mask, (None, None))}
        facts |= _mask_values(mask)
        return facts, None
    actual = sha256_of(path)
    facts["sha_matches"] = bool(pd.notna(row["sha256"]) and actual == str(row["sha256"]))
    mask_sha = _mask_sha(row["mask_path"], data_root)
    key = (actual, mask_sha) if mask_sha is not None else None
    known = memo.get(key) if key else None
    return facts | (known if known is not None else decode(path, row["mask_path"], data_root).facts), key


def read_memo(path: Path | None) -> dict[Key, dict[str, Any]]:
    """The memo's facts by key; empty when there is none or it cannot be read (it only saves time)."""
    try:
        frame = pd.read_parquet(path).astype({c: STATS_COLUMNS[c] for c in STATS_COLUMNS if c not in ROW_FACTS})
    except Exception:  # missing, partial or from an older column set: recompute, never fail on it
        return {}
    content = [c for c in STATS_COLUMNS if c not in ROW_FACTS]
    records = frame[content].to_dict("records")
    return {(str(a), str(b)): r for a, b, r in zip(frame["tile_sha256"], frame["mask_sha256"], records)}


def write_memo(path: Path, facts: Mapping[Key, Mapping[str, Any]]) -> None:
    """The memo as exactly these facts by key, written whole (so it never grows past one data set)."""
    content = [c for c in STATS_COLUMNS if c not in ROW_FACTS]
    frame = pd.DataFrame([dict(f) for f in facts.values()], columns=content)
    frame = frame.astype({c: STATS_COLUMNS[c] for c in content})
    frame.insert(0, "mask_sha256", [k[1] for k in facts])
    frame.insert(0, "tile_sha256", [k[0] for k in facts])
    write_atomic(path, lambda tmp: frame.to_parquet(tmp, index=False))


def compute_tile_stats(
    manifest: pd.DataFrame, data_root: Path, progress: Callable[[str], None] = print, memo: Path | None = None
) -> pd.DataFrame:
    """One row of STATS_COLUMNS per manifest row, in manifest order; never raises for a bad file.

    With `memo` (a parquet path), tiles whose bytes were checked before are not decoded again."""
    known = read_memo(memo)
    rows, keys = [], []
    total, reused = len(manifest), 0
    for number, (_, row) in enumerate(manifest.iterrows(), start=1):
        facts, key = tile_row(row, data_root, known)
        rows.append(facts)
        keys.append(key)
        reused += key in known
        if number % PROGRESS_EVERY == 0 or number == total:
            progress(f"tile stats: {number}/{total} tiles checked ({reused} known by content)")
    frame = pd.DataFrame(rows, columns=list(STATS_COLUMNS)).astype(STATS_COLUMNS)
    if memo is not None:
        records = frame.drop(columns=list(ROW_FACTS)).to_dict("records")
        write_memo(memo, {k: r for k, r in zip(keys, records) if k is not None})
    return frame
