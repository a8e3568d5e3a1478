"""The manifest: one row per tile file. The contract between data sources and every stage."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from ms2rgb.models.bands import RGB_BANDS, S2_BANDS
from ms2rgb.tasks.data.atomic import write_atomic
from ms2rgb.tasks.errors import Ms2rgbError

# column -> pandas dtype. Paths are relative to the manifest's data root.
COLUMNS: dict[str, str] = {
    "id": "string",  # unique tile id, e.g. "synth-Forest-00042-ms"
    "modality": "string",  # "ms" (13 bands, uint16) or "rgb" (B04/B03/B02, uint8)
    "path": "string",  # GeoTIFF relative to the data root
    "mask_path": "string",  # land-cover mask GeoTIFF (uint8, tasks.classes.SURFACE_NAMES) or <NA>
    "class": "string",  # scene class (tasks.classes.SCENE_NAMES) or <NA> for unlabelled tiles
    "split": "string",  # one of SPLITS
    "source": "string",  # "synth", "eurosat", or "scene:<scene id>"
    "location_id": "string",  # same location = a true RGB/MS pair
    "crs": "string",  # e.g. "EPSG:32633"
    "bounds_left": "float64",
    "bounds_bottom": "float64",
    "bounds_right": "float64",
    "bounds_top": "float64",
    "sha256": "string",  # of the file at `path`
    "cloud_share": "float64",  # scene tiles: share of cloud pixels (s2cloudless) at ingestion; else NaN
    # seg_test tiles of the `scenes` segmentation source: GeoTIFF of the NDWI, NDVI and NDBI of the MS tile
    # the RGB was rendered from (3 float32 bands named by their index; the report's index maps); else <NA>
    "index_path": "string",
}

# added later: absent in an older manifest means unknown (cloud share) or none (index map)
OPTIONAL_COLUMNS = frozenset({"cloud_share", "index_path"})

# The sets the methods need. A location belongs to exactly one split.
SPLITS: dict[str, str] = {
    "ms_train": "labelled MS tiles that train the teacher",
    "pair_train": "true RGB/MS pairs (same location) that train the matcher",
    "pair_test": "held-out true pairs to measure matcher retrieval",
    "rgb_train": "labelled RGB tiles the student learns from (no MS at these locations)",
    "ms_pool": "MS tiles the matcher pairs RGB tiles with (different locations; may be unlabelled)",
    "test": "labelled test locations, in both modalities",
    "fewshot": "RGB tiles with masks for few-shot detector tuning",
    "seg_test": "RGB tiles with masks to test the detector",
    "captions": "RGB tiles with masks whose captions pretrain the fallback CLIP backbone",
}


class TileFormat(NamedTuple):
    """What every tile file of one modality holds: its bands (in file order) and pixel dtype."""

    bands: tuple[str, ...]
    dtype: str


# modality -> tile format; the one table of what an MS or an RGB tile is.
MODALITY_FORMATS: dict[str, TileFormat] = {
    "ms": TileFormat(S2_BANDS, "uint16"),  # 13 Sentinel-2 L1C bands, reflectance x10000
    "rgb": TileFormat(RGB_BANDS, "uint8"),  # B04/B03/B02, tasks.data.render stretch
}
MODALITIES = tuple(MODALITY_FORMATS)
# split -> the modalities each of its locations gets, in SPLITS order. MS-only splits must not leak
# RGB and vice versa; paired splits hold both tiles of every location.
SPLIT_MODALITIES: dict[str, tuple[str, ...]] = {
    "ms_train": ("ms",),
    "pair_train": ("ms", "rgb"),
    "pair_test": ("ms", "rgb"),
    "rgb_train": ("rgb",),
    "ms_pool": ("ms",),
    "test": ("ms", "rgb"),
    "fewshot": ("rgb",),
    "seg_test": ("rgb",),
    "captions": ("rgb",),
}
# The splits a labelled tile set without masks (EuroSAT) can fill. This order lays the split
# boundaries when locations are assigned: reordering it moves locations between splits.
EUROSAT_SPLITS: tuple[str, ...] = ("ms_train", "ms_pool", "rgb_train", "pair_train", "pair_test", "test")
# The splits of the detector (method B): RGB tiles with land-cover masks.
SEGMENTATION_SPLITS: tuple[str, ...] = ("captions", "fewshot", "seg_test")
MANIFEST_NAME = "manifest.parquet"
# What prepare, every segmentation source and the readers of their tiles share (kept here, below them all).
SEGMENTATION_DIR = "data/segmentation"  # under the project root: where prepare swaps a source's folder in
# Appended to a segmentation tile's location id: the tile belongs to method B's data set, not to
# method A's, so "one location, one split" keeps the detector splits apart without touching A's.
SEGMENTATION_SUFFIX = ":seg"
SOURCE_FILE = "source.json"  # always written: which source a folder holds (an empty folder is not an output)
FOLDER_SOURCE_PREFIX = "folder:"  # `source`, `id` and `location_id` prefix of the folder source's tiles


def make_manifest(rows: list[dict]) -> pd.DataFrame:
    """Build a manifest with exactly COLUMNS, in order and with their dtypes."""
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    return frame.astype(COLUMNS)


def write_manifest(frame: pd.DataFrame, path: Path) -> None:
    """Write atomically, so a failed run never leaves a half-written manifest behind."""
    write_atomic(path, lambda tmp: frame.to_parquet(tmp, index=False))


def read_manifest(path: Path) -> pd.DataFrame:
    """Read a manifest and check it has the schema's columns."""
    if not path.exists():
        raise Ms2rgbError(
            f"{path}: manifest not found; create data first with `ms2rgb data synth`, "
            "`ms2rgb data eurosat --ms DIR` or `ms2rgb data ingest SCENE`"
        )
    frame = pd.read_parquet(path)
    for column in OPTIONAL_COLUMNS.difference(frame.columns):  # a manifest written before the column existed
        frame[column] = np.nan
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise Ms2rgbError(f"{path}: manifest lacks columns {missing}; regenerate it with ms2rgb data")
    return frame[list(COLUMNS)].astype(COLUMNS)
