"""KB-sized but real GeoTIFF data sets for tests: MS + RGB tiles, masks and a manifest.

Locations cycle through four splits per class, so every class appears in ms_train and test, and
paired splits (test, pair_train) get both modalities:

    group 0: ms_train (ms)   group 1: test (ms + rgb)   group 2: pair_train (ms + rgb)   group 3: rgb_train (rgb)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rasterio.crs import CRS
from rasterio.transform import from_origin

from ms2rgb.models.bands import RGB_BANDS, S2_BANDS
from ms2rgb.tasks.data.classes import MASK_NODATA, SURFACE_NAMES
from ms2rgb.tasks.data.geotiff import PIXEL_SIZE, TILE_SIZE, sha256_of, tile_bounds, write_tile
from ms2rgb.tasks.data.manifest import MANIFEST_NAME, SPLIT_MODALITIES, make_manifest, read_manifest, write_manifest
from ms2rgb.tasks.data.render import render_rgb

CRS_TEXT = "EPSG:32633"
# L1C reflectance x 10000 of a clear meadow, in S2_BANDS order. Scenes written for ingestion use it:
# s2cloudless would call random spectra cloud, and ingestion would skip their tiles.
MEADOW = (1200, 900, 800, 700, 1100, 1900, 2100, 2200, 2300, 800, 12, 1700, 900)


def meadow(seed: int, height: int, width: int) -> np.ndarray:
    """(13, height, width) uint16 meadow with +-10 % pixel noise; the seed makes the bytes differ."""
    noise = np.random.default_rng(seed).uniform(0.9, 1.1, (len(S2_BANDS), height, width))
    return (np.array(MEADOW, dtype=np.float64)[:, None, None] * noise).astype(np.uint16)


CLASSES = ("AnnualCrop", "Forest", "SeaLake")
SPLIT_CYCLE = tuple((split, SPLIT_MODALITIES[split]) for split in ("ms_train", "test", "pair_train", "rgb_train"))


def _location_arrays(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(13, H, W) uint16 MS in 500..3000, its (3, H, W) uint8 render and a (1, H, W) uint8 mask."""
    ms = rng.integers(500, 3000, size=(len(S2_BANDS), TILE_SIZE, TILE_SIZE), dtype=np.uint16)
    mask = rng.integers(0, len(SURFACE_NAMES), size=(1, TILE_SIZE, TILE_SIZE), dtype=np.uint8)
    mask[0, :2, :2] = MASK_NODATA  # a few unlabelled pixels, as real masks have
    return ms, render_rgb(ms), mask


def _rows_for_location(root: Path, number: int, rng: np.random.Generator, classes: tuple[str, ...]) -> list[dict]:
    """Write one location's tiles and mask; return its manifest rows."""
    scene_class = classes[number % len(classes)]
    split, modalities = SPLIT_CYCLE[(number // len(classes)) % len(SPLIT_CYCLE)]
    loc = f"loc-{number:05d}"
    crs = CRS.from_string(CRS_TEXT)
    transform = from_origin(500_000.0 + number * TILE_SIZE * PIXEL_SIZE, 5_000_000.0, PIXEL_SIZE, PIXEL_SIZE)
    ms, rgb, mask = _location_arrays(rng)
    mask_rel = f"mask/{loc}.tif"
    write_tile(root / mask_rel, mask, crs, transform, ("surface",))
    left, bottom, right, top = tile_bounds(transform)
    rows = []
    for modality in modalities:
        rel = f"{modality}/{scene_class}/{loc}.tif"
        array, names = (ms, S2_BANDS) if modality == "ms" else (rgb, RGB_BANDS)
        write_tile(root / rel, array, crs, transform, names)
        rows.append(
            {
                "id": f"synth-{scene_class}-{number:05d}-{modality}",
                "modality": modality,
                "path": rel,
                "mask_path": mask_rel,
                "class": scene_class,
                "split": split,
                "source": "synth",
                "location_id": loc,
                "crs": CRS_TEXT,
                "bounds_left": left,
                "bounds_bottom": bottom,
                "bounds_right": right,
                "bounds_top": top,
                "sha256": sha256_of(root / rel),
            }
        )
    return rows


def make_dataset(root: Path, n_locations: int = 12, classes: tuple[str, ...] = CLASSES, seed: int = 0) -> Path:
    """Write a valid data set under root; return its manifest path (root/manifest.parquet)."""
    rng = np.random.default_rng(seed)
    rows = [row for number in range(n_locations) for row in _rows_for_location(root, number, rng, classes)]
    path = root / MANIFEST_NAME
    write_manifest(make_manifest(rows), path)
    return path


def first_id(manifest_path: Path, modality: str, split: str | None = None) -> str:
    """Id of the first row with this modality (and split)."""
    frame = read_manifest(manifest_path)
    keep = frame["modality"] == modality
    if split is not None:
        keep &= frame["split"] == split
    return str(frame.loc[keep, "id"].iloc[0])


def tile_path(manifest_path: Path, tile_id: str) -> Path:
    """Absolute path of a tile, given the data root is the manifest's folder."""
    frame = read_manifest(manifest_path)
    return manifest_path.parent / str(frame.loc[frame["id"] == tile_id, "path"].iloc[0])


def update_rows(manifest_path: Path, tile_id: str, **values: object) -> None:
    """Set columns of one manifest row (e.g. class=..., location_id=...)."""
    frame = read_manifest(manifest_path)
    for column, value in values.items():
        frame.loc[frame["id"] == tile_id, column] = value
    write_manifest(frame, manifest_path)


def replace_tile(manifest_path: Path, tile_id: str, array: np.ndarray, fix_sha: bool = True) -> Path:
    """Overwrite a tile with `array` (same CRS/transform); optionally record its new checksum."""
    path = tile_path(manifest_path, tile_id)
    transform = from_origin(500_000.0, 5_000_000.0, PIXEL_SIZE, PIXEL_SIZE)
    write_tile(path, array, CRS.from_string(CRS_TEXT), transform)
    if fix_sha:
        update_rows(manifest_path, tile_id, sha256=sha256_of(path))
    return path
