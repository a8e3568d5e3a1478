"""The prepared cache: one contiguous .npy per split and modality, opened memory-mapped.

Training reads batches from these arrays instead of opening thousands of GeoTIFFs per epoch.
Beside each array lies its index, `<split>-<modality>-index.parquet`: the rows of that split and
modality in cache order. A split's array and index are written from that split's rows alone, so
their bytes change only when the split changes, and a stage that depends on them (dvc.yaml) is
made stale only by the splits it reads.

A rebuild reuses the previous cache split by split: a split whose index would come out the same
(same ids, classes, locations and tile sha256 in the same order) and whose tiles were all read last
time is linked from the old folder instead of read again, so a scene landing in `ms_pool` re-reads
only the pool. `unreadable.json` lists the tiles that could not be read (validate reports them).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from numpy.lib.format import open_memmap

from ms2rgb.tasks.data.atomic import write_json_atomic
from ms2rgb.tasks.data.classes import MASK_NODATA, SCENE_NAMES
from ms2rgb.tasks.data.geotiff import TILE_SIZE
from ms2rgb.tasks.data.manifest import MODALITY_FORMATS
from ms2rgb.tasks.data.tile_stats import Key, decode, memo_key, read_memo, write_memo
from ms2rgb.tasks.errors import Ms2rgbError

# The columns of a split's index (what open_split and the validation stamps read), with dtypes.
INDEX_COLUMNS: dict[str, str] = {
    "id": "string",
    "class": "string",
    "location_id": "string",
    "cache_row": "int64",
    "sha256": "string",
}


def cache_name(split: str, modality: str, kind: str = "image") -> str:
    return f"{split}-{modality}.npy" if kind == "image" else f"{split}-{modality}-{kind}.npy"


def index_name(split: str, modality: str) -> str:
    return f"{split}-{modality}-index.parquet"


UNREADABLE_NAME = "unreadable.json"  # ids of the tiles the last build could not read, sorted


def index_frame(rows: pd.DataFrame) -> pd.DataFrame:
    """One split's index in cache_row order; depends on these rows only (no pandas index)."""
    return rows.sort_values("cache_row")[list(INDEX_COLUMNS)].astype(INDEX_COLUMNS).reset_index(drop=True)


def _unreadable_before(previous: Path | None) -> set[str] | None:
    """Ids the previous build could not read; None when there is no whole previous build to reuse."""
    try:
        return set(json.loads((previous / UNREADABLE_NAME).read_text())) if previous else None
    except (OSError, ValueError, TypeError):
        return None


def _reusable(previous: Path, index: pd.DataFrame, split: str, modality: str, with_masks: bool) -> list[Path]:
    """The old files of this split to link, or [] when the old cache of it differs from what is asked."""
    names = [cache_name(split, modality)] + ([cache_name(split, modality, "mask")] if with_masks else [])
    old_index = previous / index_name(split, modality)
    if not old_index.is_file() or (previous / cache_name(split, modality, "mask")).is_file() != with_masks:
        return []
    try:
        same = pd.read_parquet(old_index).astype(INDEX_COLUMNS).equals(index)
        rows = [np.load(previous / name, mmap_mode="r").shape[0] for name in names]
    except (OSError, ValueError):
        return []
    return [previous / name for name in names] if same and rows == [len(index)] * len(names) else []


def _link(source: Path, target: Path) -> None:
    """Hard-link when the file system allows (no copy of a large array), else copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _fill(
    arrays: np.ndarray,
    masks: np.ndarray | None,
    group: pd.DataFrame,
    root: Path,
    modality: str,
    facts: dict[Key, dict[str, Any]],
) -> list[str]:
    """Copy tiles into the cache; return ids of tiles that could not be read (validate reports them).

    Each tile is decoded once: its facts go into `facts` by content, so validation need not decode it again."""
    tile = MODALITY_FORMATS[modality]
    bad: list[str] = []
    for i, row in enumerate(group.itertuples(index=False)):
        path = root / row.path
        if not path.is_file():
            bad.append(row.id)
            continue
        decoded, key = decode(path, row.mask_path, root), memo_key(path, row.mask_path, root)
        if key is not None:
            facts[key] = decoded.facts
        array, mask = decoded.tile, decoded.mask
        unusable = array is None or array.shape[0] != len(tile.bands) or array.dtype.name != tile.dtype
        if array is None or unusable or (mask is None and not pd.isna(row.mask_path)):
            bad.append(row.id)
            continue
        try:
            arrays[i] = array[:, :TILE_SIZE, :TILE_SIZE]
            if masks is not None:
                masks[i] = mask[0] if mask is not None else MASK_NODATA
        except ValueError:  # smaller than a tile
            bad.append(row.id)
    return bad


def _write_split(
    group: pd.DataFrame, root: Path, out_dir: Path, split: str, modality: str, facts: dict[Key, dict[str, Any]]
) -> list[str]:
    """Read one split's tiles (and masks) into fresh arrays; return the ids that could not be read."""
    tile = MODALITY_FORMATS[modality]
    arrays = open_memmap(
        out_dir / cache_name(split, modality),
        mode="w+",
        dtype=tile.dtype,
        shape=(len(group), len(tile.bands), TILE_SIZE, TILE_SIZE),
    )
    masks = None
    if group["mask_path"].notna().any():
        masks = open_memmap(
            out_dir / cache_name(split, modality, "mask"),
            mode="w+",
            dtype="uint8",
            shape=(len(group), TILE_SIZE, TILE_SIZE),
        )
    bad = _fill(arrays, masks, group, root, modality, facts)
    arrays.flush()
    if masks is not None:
        masks.flush()
    return bad


def build_cache(
    manifest: pd.DataFrame,
    root: Path,
    out_dir: Path,
    progress: Callable[[str], None] = print,
    previous: Path | None = None,
    memo: Path | None = None,
) -> tuple[pd.DataFrame, list[str]]:
    """Write the cache into out_dir, reusing from the `previous` cache folder the splits that did not
    change; return the manifest with cache_file/cache_row columns and the unreadable ids.

    With `memo`, the facts of every tile decoded here are kept there by content (tasks/data/tile_stats.py)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = manifest.sort_values(["split", "modality", "id"]).reset_index(drop=True)
    manifest["cache_file"] = ""
    manifest["cache_row"] = -1
    unreadable_before = _unreadable_before(previous)
    listed = set(manifest["sha256"].dropna().astype(str))
    facts = {key: known for key, known in read_memo(memo).items() if key[0] in listed}
    bad: list[str] = []
    for (split, modality), group in manifest.groupby(["split", "modality"], sort=True):
        manifest.loc[group.index, "cache_file"] = cache_name(split, modality)
        manifest.loc[group.index, "cache_row"] = np.arange(len(group))
        index = index_frame(manifest.loc[group.index])
        with_masks = bool(group["mask_path"].notna().any())
        reuse = []
        if previous is not None and unreadable_before is not None and unreadable_before.isdisjoint(group["id"]):
            reuse = _reusable(previous, index, split, modality, with_masks)
        for source in reuse:
            _link(source, out_dir / source.name)
        if not reuse:
            bad += _write_split(group, root, out_dir, split, modality, facts)
        index.to_parquet(out_dir / index_name(split, modality), index=False)
        progress(f"cache: {split}/{modality}: {len(group)} tiles{' (unchanged: kept)' if reuse else ''}")
    write_json_atomic(out_dir / UNREADABLE_NAME, sorted(bad))
    if memo is not None:
        write_memo(memo, facts)
    return manifest, bad


@dataclass
class CachedSplit:
    """Memory-mapped tiles of one split and modality, with labels aligned row by row."""

    images: np.ndarray  # (N, C, 64, 64) memmap
    labels: np.ndarray  # (N,) int64 scene-class index, -1 where unlabelled
    ids: list[str]
    location_ids: list[str]
    masks: np.ndarray | None  # (N, 64, 64) uint8 surface ids, or None


def open_split(prepared_dir: Path, split: str, modality: str, masks: bool = False) -> CachedSplit:
    """Open one cached split; raises with the fix when the cache is missing.

    Reads only this split's files: its index, its array and, with `masks`, its mask array.
    """
    index_path, path = prepared_dir / index_name(split, modality), prepared_dir / cache_name(split, modality)
    rows = pd.read_parquet(index_path).sort_values("cache_row") if index_path.exists() else None
    if rows is None or rows.empty or not path.exists():
        raise Ms2rgbError(
            f"{path}: no cached {modality} tiles for split {split!r}; run the prepare stage "
            "(`ms2rgb stage prepare` or `dvc repro prepare`) with data that has this split"
        )
    mask_path = prepared_dir / cache_name(split, modality, "mask")
    labels = rows["class"].map(lambda c: SCENE_NAMES.index(c) if isinstance(c, str) else -1)
    return CachedSplit(
        images=np.load(path, mmap_mode="r"),
        labels=labels.to_numpy(dtype=np.int64),
        ids=rows["id"].tolist(),
        location_ids=rows["location_id"].tolist(),
        masks=np.load(mask_path, mmap_mode="r") if masks and mask_path.exists() else None,
    )


def require_bands(split: CachedSplit, bands: tuple[str, ...], where: str) -> CachedSplit:
    """Return `split` if its tiles carry exactly len(bands) channels, else raise BandCountError.

    Catches e.g. RGB tiles (3 bands) handed to the 13-band MS teacher before any training starts.
    """
    from ms2rgb.tasks.errors import BandCountError

    if split.images.ndim != 4 or split.images.shape[1] != len(bands):
        raise BandCountError(
            where,
            f"tiles of shape {tuple(split.images.shape)} have "
            f"{split.images.shape[1] if split.images.ndim == 4 else '?'} band(s), the model "
            f"expects {len(bands)} ({', '.join(bands)})",
            "point the stage at the split of the right modality, or re-run the prepare stage",
        )
    return split
