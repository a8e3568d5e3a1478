"""Clouds (s2cloudless) at ingestion, in the weak labels and in validation, on real GeoTIFFs written here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
from helpers_data import make_dataset, meadow
from helpers_params import config
from rasterio.transform import Affine

from ms2rgb.models.bands import S2_BANDS
from ms2rgb.tasks.data.classes import MASK_NODATA
from ms2rgb.tasks.data.clouds import cloud_masks
from ms2rgb.tasks.data.manifest import MANIFEST_NAME, read_manifest, write_manifest
from ms2rgb.tasks.data.sources.scene_segmentation import build_scene_segmentation
from ms2rgb.tasks.data.sources.scenes import INGEST_REPORT, ingest_scene
from ms2rgb.tasks.validate import validate_dataset

# L1C reflectance x 10000 of a thick cloud: bright and flat from blue to SWIR.
CLOUD = dict.fromkeys(S2_BANDS, 6000) | {"B09": 2000, "B10": 200}


def scene_with_a_cloud(path: Path, cloudy_cols: int = 64) -> Path:
    """128 x 192 px at 10 m (2 x 3 tiles): meadow, the first `cloudy_cols` columns under a cloud."""
    array = meadow(0, 128, 192)
    cloud = np.array([CLOUD[b] for b in S2_BANDS])[:, None, None] * np.random.default_rng(1).uniform(0.97, 1.03)
    array[:, :, :cloudy_cols] = cloud.astype(np.uint16)
    transform = Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 5000000.0)
    profile = dict(driver="GTiff", width=192, height=128, count=13, dtype="uint16", crs="EPSG:32633")
    with rasterio.open(path, "w", transform=transform, **profile) as dst:
        dst.write(array)
    return path


def test_the_cloud_mask_finds_the_cloud_and_not_the_meadow(tmp_path: Path) -> None:
    with rasterio.open(scene_with_a_cloud(tmp_path / "s.tif")) as src:
        scene = src.read()
    tiles = np.stack([scene[:, :64, :64], scene[:, :64, 128:]])  # under the cloud, clear
    masks = cloud_masks(tiles)
    assert masks.shape == (2, 64, 64) and masks[0].mean() > 0.9 and masks[1].mean() < 0.05
    with pytest.raises(ValueError, match="multiples of 4"):
        cloud_masks(np.zeros((1, 13, 6, 6), np.uint16))


def test_cloudy_tiles_are_not_ingested_and_are_counted(tmp_path: Path) -> None:
    scene = scene_with_a_cloud(tmp_path / "cloudy.tif")
    frame = ingest_scene([scene], tmp_path / "scenes", progress=None, max_cloud_share=0.2)
    assert len(frame) == 4 and not frame["location_id"].str.endswith("_c0").any()  # column 0 is under the cloud
    assert (frame["cloud_share"] < 0.05).all()
    report = json.loads((tmp_path / "scenes" / "cloudy" / INGEST_REPORT).read_text())
    assert report.pop("radiometry")["source"] == "none"  # a bare GeoTIFF, no offset given
    assert report == {"tiles": 4, "invalid": 0, "cloudy": 2, "max_cloud_share": 0.2}
    kept = ingest_scene([scene], tmp_path / "all", progress=None)  # max_cloud_share 1: every tile
    assert len(kept) == 6 and kept["cloud_share"].max() > 0.9


def test_weak_labels_ignore_cloudy_pixels(tmp_path: Path) -> None:
    scene = scene_with_a_cloud(tmp_path / "s.tif", cloudy_cols=32)  # half of the first tile column
    ingest_scene([scene], tmp_path / "scenes", progress=None)
    seg = config("data.segmentation")
    out = build_scene_segmentation(
        tmp_path / "scenes", tmp_path / "seg", config("weak_labels").thresholds(), 1, seg.shares, 0, lambda _: None
    )
    first = out[out["location_id"].str.contains("_r0_c0")].iloc[0]
    mask = rasterio.open(tmp_path / "seg" / first["mask_path"]).read(1)
    assert (mask[:, :28] == MASK_NODATA).all()  # under the cloud (its 40 m margin aside): no label
    assert (mask[:, 40:] != MASK_NODATA).mean() > 0.9  # the meadow beside it is labelled


def test_validation_refuses_a_pool_tile_recorded_cloudier_than_allowed(tmp_path: Path) -> None:
    data = tmp_path / "data"
    make_dataset(data)
    manifest = read_manifest(data / MANIFEST_NAME)
    pool = manifest.index[manifest["modality"] == "ms"]  # as if these had come from a scene
    manifest.loc[pool, "cloud_share"] = 0.0
    manifest.loc[pool[0], "cloud_share"] = 0.5
    write_manifest(manifest, data / MANIFEST_NAME)
    outcome = validate_dataset(data / MANIFEST_NAME, data, tmp_path / "report", config("validate"), lambda _: None)
    failed = [f for f in outcome.failed if f["column"] == "cloud_share"]
    assert not outcome.passed and failed[0]["offending"] == [manifest.loc[pool[0], "id"]]


def test_a_manifest_written_before_cloud_shares_reads_as_unknown(tmp_path: Path) -> None:
    data = tmp_path / "data"
    make_dataset(data)
    frame = pd.read_parquet(data / MANIFEST_NAME).drop(columns="cloud_share")
    frame.to_parquet(data / "old.parquet", index=False)
    assert read_manifest(data / "old.parquet")["cloud_share"].isna().all()
    shutil.rmtree(data)
