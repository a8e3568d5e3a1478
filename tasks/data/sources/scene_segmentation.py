"""The `scenes` segmentation source: the detector's tiles from ingested Sentinel-2 scenes, with no hand labels.

Each ingested MS pool tile gives one RGB tile (the B04/B03/B02 render every RGB tile here gets) and a
land-cover mask from its own 13 bands (`weak_labels.py`, cloudy pixels by s2cloudless ignored): the
multispectral bands teach the RGB detector at pixel level. Tiles are grouped into square blocks of
`block_tiles` x `block_tiles` on the scene grid, and whole blocks go to `captions`, `fewshot` or
`seg_test` by `shares`, so the detector is scored on ground it never saw. Output, under `out_dir`
(prepare swaps it in whole):

    <scene>/rgb/<tile>.tif, <scene>/mask/<tile>.tif, manifest.parquet (paths relative to out_dir),
    legend.json (the weak-label surfaces, `WEAK_LEGEND`; mask values index it), and for `seg_test`
    tiles <scene>/index/<tile>.tif (manifest column `index_path`): the NDWI, NDVI and NDBI the votes
    read, 3 float32 bands named by `INDEX_BANDS`, for the report's index maps. They are written here,
    from the MS tile in hand, so the report reads only this folder: the scene tiles stay out of
    evaluate's deps, and a scene tile removed later cannot break the report.

A segmentation tile shows the place of an MS pool tile, but belongs to method B's data set, not
method A's: its location id is the pool tile's with `SEGMENTATION_SUFFIX`, so the validation rule
"one location, one split" still guards the three detector splits against each other.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rasterio.crs import CRS
from rasterio.transform import from_bounds

from ms2rgb.models.bands import RGB_BANDS
from ms2rgb.tasks.data.clouds import cloud_masks
from ms2rgb.tasks.data.geotiff import read_tile, sha256_of, write_tile
from ms2rgb.tasks.data.legend import WEAK_LEGEND, surface_remap, write_legend
from ms2rgb.tasks.data.manifest import (
    MANIFEST_NAME,
    SEGMENTATION_SUFFIX,
    SOURCE_FILE,
    make_manifest,
    read_manifest,
    write_manifest,
)
from ms2rgb.tasks.data.render import render_rgb
from ms2rgb.tasks.data.weak_labels import IndexThresholds, spectral_indices, weak_labels
from ms2rgb.tasks.errors import Ms2rgbError

BATCH = 256  # tiles read and cloud-scored together
# Masks hold WEAK_LEGEND indices: only the surfaces the indices can claim, so the detector is not asked
# for a class (crop, roof, ...) no weak label ever contains.
TO_LEGEND = surface_remap(WEAK_LEGEND)
# spectral_indices keys of a seg_test tile's index map, in band order; the band descriptions are these
# upper-cased. float32, as computed: GDAL before 3.11 has no float16 GeoTIFF, and the report's check
# against the source bands wants the values unrounded. Only seg_test: the report shows held-out tiles.
INDEX_BANDS = ("ndwi", "ndvi", "ndbi")
INDEX_SPLIT = "seg_test"


def grid_positions(rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of each tile on its scene's grid, from the tiles' bounds (any id scheme)."""
    width = float((rows["bounds_right"] - rows["bounds_left"]).median())
    height = float((rows["bounds_top"] - rows["bounds_bottom"]).median())
    col = np.rint((rows["bounds_left"] - rows["bounds_left"].min()) / width).astype(int).to_numpy()
    row = np.rint((rows["bounds_top"].max() - rows["bounds_top"]) / height).astype(int).to_numpy()
    return row, col


def block_splits(row: np.ndarray, col: np.ndarray, block: int, shares: dict[str, float], key: str) -> np.ndarray:
    """The split of each tile: blocks of block x block tiles, shuffled by `key`, cut by the shares."""
    blocks = row // block * (int(col.max()) // block + 1) + col // block
    unique = np.unique(blocks)
    digest = hashlib.sha256(key.encode()).digest()
    order = unique[np.random.default_rng(int.from_bytes(digest[:8], "little")).permutation(len(unique))]
    bounds = np.rint(np.cumsum(list(shares.values())) * len(order)).astype(int)
    split_of = {}
    for name, start, stop in zip(shares, np.concatenate([[0], bounds[:-1]]), bounds):
        split_of.update(dict.fromkeys(order[start:stop].tolist(), name))
    return np.array([split_of[b] for b in blocks.tolist()])


def _tile_rows(scene_dir: Path, frame: pd.DataFrame, out_dir: Path, cfg: IndexThresholds, splits: np.ndarray) -> list:
    rows = []
    for start in range(0, len(frame), BATCH):  # clouds scored a batch at a time; memory stays bounded
        batch = frame.iloc[start : start + BATCH]
        tiles = np.stack(
            [read_tile(scene_dir.parent / p, expect_bands=13, expect_dtype="uint16") for p in batch["path"]]
        )
        for (_, tile), ms, cloudy, split in zip(batch.iterrows(), tiles, cloud_masks(tiles), splits[start:]):
            labels = TO_LEGEND[weak_labels(ms, cfg, cloudy)]  # surface ids -> WEAK_LEGEND indices
            rows.append(_write_tile_pair(scene_dir.name, tile, ms, labels, out_dir, split))
    return rows


def _write_tile_pair(
    scene: str, tile: pd.Series, ms: np.ndarray, labels: np.ndarray, out_dir: Path, split: str
) -> dict[str, Any]:
    """Write one tile's RGB render and weak mask (and, in INDEX_SPLIT, its index map); its manifest row.
    The georeference is the pool tile's, from its manifest bounds (no second read of the file)."""
    crs = CRS.from_string(tile["crs"])
    bounds = (tile["bounds_left"], tile["bounds_bottom"], tile["bounds_right"], tile["bounds_top"])
    transform = from_bounds(*bounds, width=ms.shape[2], height=ms.shape[1])
    name = Path(tile["path"]).stem
    rgb_rel, mask_rel = f"{scene}/rgb/{name}.tif", f"{scene}/mask/{name}.tif"
    write_tile(out_dir / rgb_rel, render_rgb(ms), crs, transform, band_names=RGB_BANDS)
    write_tile(out_dir / mask_rel, labels[None], crs, transform, band_names=("surface",))
    index_rel = f"{scene}/index/{name}.tif" if split == INDEX_SPLIT else None
    if index_rel is not None:
        indices = spectral_indices(ms)
        maps = np.stack([indices[key] for key in INDEX_BANDS]).astype(np.float32)  # (3, H, W)
        write_tile(out_dir / index_rel, maps, crs, transform, band_names=tuple(k.upper() for k in INDEX_BANDS))
    location = f"{tile['location_id']}{SEGMENTATION_SUFFIX}"
    return tile.to_dict() | {
        "id": f"{location}-rgb",
        "modality": "rgb",
        "path": rgb_rel,
        "mask_path": mask_rel,
        "index_path": index_rel,
        "class": None,
        "split": split,
        "location_id": location,
        "source": f"weak_labels:{tile['source']}",
        "sha256": sha256_of(out_dir / rgb_rel),
    }


def build_scene_segmentation(
    scenes_dir: Path,
    out_dir: Path,
    cfg: IndexThresholds,
    block: int,
    shares: dict[str, float],
    seed: int,
    progress: Callable[[str], None] = print,
) -> pd.DataFrame:
    """Write the segmentation tiles of every scene under `scenes_dir` into `out_dir`; return their manifest."""
    manifests = sorted(scenes_dir.glob(f"*/{MANIFEST_NAME}")) if scenes_dir.is_dir() else []
    if not manifests:
        raise Ms2rgbError(
            f"data.segmentation.source is 'scenes' but {scenes_dir} holds no ingested scene; "
            "add one with `ms2rgb data ingest SCENE` (or drop it into the landing folder), or set it to 'synth'"
        )
    rows: list[dict] = []
    for path in manifests:
        frame = read_manifest(path).reset_index(drop=True)
        row, col = grid_positions(frame)
        splits = block_splits(row, col, block, shares, f"{seed}:{path.parent.name}")
        rows += _tile_rows(path.parent, frame, out_dir, cfg, splits)
        counts = pd.Series(splits).value_counts().to_dict()
        progress(f"segmentation: {path.parent.name}: {len(frame)} tiles labelled by spectral indices, {counts}")
    manifest = make_manifest(rows)
    write_manifest(manifest, out_dir / MANIFEST_NAME)
    (out_dir / SOURCE_FILE).write_text(json.dumps({"source": "scenes"}) + "\n")
    write_legend(out_dir, WEAK_LEGEND)
    return manifest
