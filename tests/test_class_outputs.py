"""Outputs people can serve: class maps as valid COGs with colours and names; polygons whole across
blocks, sieved, as GeoJSON and GeoPackage.

The writers are tested on class rasters written here; `detect` on the stand-in detector whose class
map is `red > 127` (helpers_class_maps.py), so each test knows every region it should find.
"""

from __future__ import annotations

import json
from pathlib import Path
from xml.etree import ElementTree as ET

import numpy as np
import pyogrio
import pytest
import rasterio
from helpers_class_maps import red_image, save_tiny_student, use_red_detector
from helpers_rasters import CRS, TRANSFORM, write_raster
from rasterio.warp import transform_geom
from rio_cogeo.cogeo import cog_validate
from shapely.geometry import shape

from ms2rgb.tasks.data.class_polygons import PolygonSink, polygonize
from ms2rgb.tasks.data.class_raster import sidecar
from ms2rgb.tasks.data.classes import SCENE_NAMES
from ms2rgb.tasks.data.windows import plan_blocks
from ms2rgb.tasks.detection.detect import detect
from ms2rgb.tasks.detection.plots import class_colours
from ms2rgb.tasks.errors import Ms2rgbError
from ms2rgb.tasks.prediction.scene_map import predict

NODATA = 255


def class_raster(path: Path, ids: np.ndarray) -> Path:
    return write_raster(path, ids[None].astype(np.uint8), nodata=NODATA)  # (1, H, W) class ids


def regions(tmp_path: Path, ids: np.ndarray, budget: int, min_px: int = 1) -> list[tuple[str, float, dict]]:
    """(class, area in m², geometry in the raster's CRS) of each polygon `polygonize` writes."""
    raster = class_raster(tmp_path / "ids.tif", ids)
    sink = PolygonSink(
        tmp_path / "p.geojson",
        tmp_path / "p.gpkg",
        TRANSFORM,
        rasterio.crs.CRS.from_string(CRS),
        {"class": ["field", "forest", "town"]},
    )
    try:
        polygonize(raster, sink, budget, NODATA, min_px, tmp_path / "sieved.tif")
    finally:
        sink.close()
    features = json.loads((tmp_path / "p.geojson").read_text())["features"]
    assert pyogrio.read_info(tmp_path / "p.gpkg")["features"] == len(features) == sink.count
    return [
        (f["properties"]["class"], f["properties"]["area_m2"], transform_geom("EPSG:4326", CRS, f["geometry"]))
        for f in features
    ]


def test_a_region_crossing_every_block_border_is_one_polygon_of_its_pixel_area(tmp_path: Path) -> None:
    ids = np.zeros((200, 200), np.uint8)
    ids[20:190, 30:60] = 1  # a U of forest down through all four 50-row blocks and back
    ids[150:190, 30:170] = 1
    ids[20:190, 140:170] = 1
    ids[90:110, 90:110] = 2  # a town inside the U, on a block border
    budget = 50 * 200
    assert len(plan_blocks(200, 200, budget)) == 4
    found = regions(tmp_path, ids, budget)
    forest = [(area, geometry) for name, area, geometry in found if name == "forest"]
    assert len(forest) == 1 and forest[0][0] == (ids == 1).sum() * 100.0  # 10 m pixels
    assert shape(forest[0][1]).area == pytest.approx((ids == 1).sum() * 100.0, rel=1e-6)
    assert sorted(name for name, _, _ in found) == ["field", "forest", "town"]  # the field: one region, a hole
    (tmp_path / "one").mkdir()
    whole = regions(tmp_path / "one", ids, 10**6)  # one block: nothing to merge
    assert sorted((n, a) for n, a, _ in found) == sorted((n, a) for n, a, _ in whole)


def test_the_sieve_drops_specks_under_min_area_even_across_block_borders(tmp_path: Path) -> None:
    ids = np.zeros((200, 200), np.uint8)
    ids[10, 10:12] = 1  # a 2-px speck inside a block
    ids[49:51, 100] = 2  # a 2-px speck cut by the border of rows 49 | 50
    ids[48:51, 150] = 1  # a 3-px line cut 2 | 1 by it: each block alone would see a speck
    budget = 56 * 200  # with the 3-px halo of min-area 3: blocks of 50 rows
    assert int(plan_blocks(200, 200, budget, halo=3)[1].row_off) == 50
    kept = regions(tmp_path, ids, budget, min_px=3)
    assert sorted((n, a) for n, a, _ in kept) == [("field", 3999700.0), ("forest", 300.0)]  # 10 m pixels
    with rasterio.open(tmp_path / "sieved.tif") as sieved:
        assert sieved.read(1)[10, 10] == 0 and sieved.read(1)[50, 100] == 0 and sieved.read(1)[48, 150] == 1
    (tmp_path / "p.gpkg").unlink()
    assert len(regions(tmp_path, ids, budget, min_px=2)) == 4  # specks of 2 px stay with min-area 2


def test_detect_writes_a_valid_cog_with_colours_names_and_whole_polygons(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_red_detector(monkeypatch)
    red = np.zeros((600, 520), np.uint8)
    red[100:500, 200:260] = 255  # a forest strip crossing blocks of detect (64 px) and of the polygons (strips)
    red[300, 400:402] = 255  # a 2-px speck
    image = red_image(tmp_path / "scene.tif", red)
    result = detect(
        image, "water,forest", tmp_path / "out", root=tmp_path, window_px=190 * 190, min_area_px=3, gpkg=True
    )
    tif = result["outputs"]["classes.tif"]
    valid, errors, warnings = cog_validate(tif)
    assert valid and not errors, (errors, warnings)
    with rasterio.open(tif) as out:
        assert out.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG" and out.block_shapes == [(512, 512)]
        assert out.overviews(1) == [2]  # 600 px > one 512-px tile: one overview level
        colours = class_colours(["water", "forest"])
        assert out.colormap(1)[1][:3] == tuple(int(c * 255) for c in colours[1])
        assert (out.read(1) == 1).sum() == 400 * 60  # the speck is sieved away
    pam = ET.parse(sidecar(Path(tif))).getroot()
    assert [c.text for c in pam.iter("Category")] == ["water", "forest"]
    rows = [[f.text for f in row] for row in pam.iter("Row")]
    assert rows[1][:2] == ["1", "forest"] and len(rows) == 2
    features = json.loads(Path(result["outputs"]["classes.geojson"]).read_text())["features"]
    forest = [f for f in features if f["properties"]["class"] == "forest"]
    assert len(forest) == 1 and forest[0]["properties"]["area_m2"] == 400 * 60 * 100.0
    assert result["polygons"] == len(features) == 2 == pyogrio.read_info(result["outputs"]["classes.gpkg"])["features"]
    assert result["shares"] == {"water": round(1 - 24000 / 312000, 4), "forest": round(24000 / 312000, 4)}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        Path(p).name for p in result["outputs"].values()
    )  # no temporary files left


def test_a_min_area_beyond_the_window_budget_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_red_detector(monkeypatch)
    image = red_image(tmp_path / "scene.tif", np.zeros((64, 64), np.uint8))
    with pytest.raises(Ms2rgbError, match=r"--min-area 5000 px must lie in 1\.\.1023"):
        detect(image, "water,forest", tmp_path / "out", root=tmp_path, min_area_px=5000)


def test_predict_writes_valid_cogs_with_the_scene_names(tmp_path: Path) -> None:
    root = tmp_path / "project"
    save_tiny_student(root)
    image = red_image(tmp_path / "scene.tif", np.zeros((130, 200), np.uint8))
    result = predict(image, tmp_path / "out", root=root)
    for kind in ("scenes.tif", "probabilities.tif"):
        valid, errors, _ = cog_validate(result["outputs"][kind])
        assert valid and not errors
        with rasterio.open(result["outputs"][kind]) as out:
            assert out.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
    pam = ET.parse(result["outputs"]["scenes.tif.aux.xml"]).getroot()
    assert [c.text for c in pam.iter("Category")] == SCENE_NAMES
