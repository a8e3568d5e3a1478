"""`detect` and `predict` check the input's pixel size against the model's, and resample on request.

The detector is a stand-in whose class map is `red > 127` (helpers_class_maps.py); the student a
tiny random SceneCNN. Images are 5 m (2x finer than the 10 m training tiles), 10.5 m (within the
tolerance) or in degrees.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from helpers_class_maps import red_image, save_tiny_student, use_red_detector
from rasterio.warp import transform_geom
from shapely.geometry import shape

from ms2rgb.flows.cli import main as cli_main
from ms2rgb.models.classifier import SceneCNN
from ms2rgb.tasks.data.cache import CachedSplit
from ms2rgb.tasks.data.geotiff import PIXEL_SIZE
from ms2rgb.tasks.data.pixel_size import recorded_pixel_size, training_pixel_size
from ms2rgb.tasks.detection.detect import detect
from ms2rgb.tasks.detector import tuned_pixel_size
from ms2rgb.tasks.errors import RasterError
from ms2rgb.tasks.prediction.scene_map import predict
from ms2rgb.tasks.training.store import load_model


def square(size: int, top: int, left: int, side: int) -> np.ndarray:
    red = np.zeros((size, size), np.uint8)
    red[top : top + side, left : left + side] = 255
    return red


def test_detect_stops_on_a_2x_finer_image_naming_both_sizes_and_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_red_detector(monkeypatch)
    image = red_image(tmp_path / "fine.tif", square(128, 32, 32, 64), pixel_m=5.0)
    with pytest.raises(RasterError, match=r"fine\.tif: has 5 m pixels but the model was trained on 10 m") as e:
        detect(image, "water,forest", tmp_path / "out", root=tmp_path)
    assert "\n" not in str(e.value) and "--resample" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_detect_resamples_to_the_training_grid_over_the_same_bounds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_red_detector(monkeypatch)
    image = red_image(tmp_path / "fine.tif", square(256, 64, 32, 96), pixel_m=5.0)  # a 480 m square
    result = detect(image, "water,forest", tmp_path / "out", root=tmp_path, resample=True)
    assert "from 5 m to 10 m" in result["resampled"] and "10 m grid" in result["resampled"]
    with rasterio.open(image) as src, rasterio.open(result["outputs"]["classes.tif"]) as out:
        assert out.res == (10.0, 10.0) and (out.height, out.width) == (128, 128)
        assert out.bounds == src.bounds and out.crs == src.crs
        assert (out.read(1) == 1).sum() == 48 * 48  # the square, now in 10 m pixels
    forest = [
        f
        for f in json.loads(Path(result["outputs"]["classes.geojson"]).read_text())["features"]
        if f["properties"]["class"] == "forest"
    ]
    assert len(forest) == 1 and forest[0]["properties"]["area_m2"] == 480.0 * 480.0
    native = shape(transform_geom("EPSG:4326", "EPSG:32633", forest[0]["geometry"]))
    assert native.area == pytest.approx(480.0 * 480.0, rel=1e-6)


def test_pixels_within_the_tolerance_are_read_as_they_are(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_red_detector(monkeypatch)
    image = red_image(tmp_path / "near.tif", square(100, 10, 10, 40), pixel_m=10.5)
    result = detect(image, "water,forest", tmp_path / "out", root=tmp_path)
    assert result["resampled"] is None
    with rasterio.open(image) as src, rasterio.open(result["outputs"]["classes.tif"]) as out:
        assert (out.transform, out.shape) == (src.transform, src.shape)


def test_a_geographic_crs_is_refused_with_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_red_detector(monkeypatch)
    image = red_image(tmp_path / "wgs84.tif", square(100, 10, 10, 40), crs="EPSG:4326")
    for resample in (False, True):
        with pytest.raises(RasterError, match=r"wgs84\.tif: has a geographic CRS \(EPSG:4326\).*gdalwarp -t_srs"):
            detect(image, "water,forest", tmp_path / "out", root=tmp_path, resample=resample)


def test_a_detector_of_unknown_pixel_size_is_not_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_red_detector(monkeypatch, pixel_size_m=None)  # tuned on a user's own images
    image = red_image(tmp_path / "fine.tif", square(128, 32, 32, 64), pixel_m=5.0)
    assert detect(image, "water,forest", tmp_path / "out", root=tmp_path)["resampled"] is None


def test_models_record_their_training_pixel_size() -> None:
    assert training_pixel_size(torch.nn.Linear(1, 1)) == PIXEL_SIZE  # records nothing: the project's 10 m
    assert recorded_pixel_size({}) == PIXEL_SIZE and recorded_pixel_size({"pixel_size_m": None}) is None
    split = CachedSplit(np.zeros((1, 3, 64, 64)), np.zeros(1), ["synth-r000c000-rgb"], ["synth"], None)
    assert tuned_pixel_size(split) == PIXEL_SIZE
    split.ids = ["folder:farm-r000c000-rgb"]
    assert tuned_pixel_size(split) is None


def test_predict_stops_on_a_2x_finer_image_and_resamples_on_request(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "project"
    weights = save_tiny_student(root)
    student = load_model(weights, "scene_cnn", "student")
    assert isinstance(student, SceneCNN) and training_pixel_size(student) == 10.0
    image = red_image(tmp_path / "fine.tif", square(256, 0, 0, 128), pixel_m=5.0)
    with pytest.raises(RasterError, match=r"fine\.tif: has 5 m pixels but the model was trained on 10 m") as e:
        predict(image, tmp_path / "out", root=root)
    assert "\n" not in str(e.value) and "--resample" in str(e.value)
    argv = ["--root", str(root), "predict", str(image), "--out", str(tmp_path / "out")]
    assert cli_main(argv) == 2 and "5 m pixels" in capsys.readouterr().err
    assert cli_main([*argv, "--resample"]) == 0
    printed = capsys.readouterr().out
    assert "input: resampled from 5 m to 10 m pixels" in printed and "grid: 2 x 2 cells of 64 px" in printed
    with rasterio.open(tmp_path / "out" / "fine_scenes.tif") as out, rasterio.open(image) as src:
        assert out.res == (640.0, 640.0) and out.bounds == src.bounds  # 64-px cells of 10 m pixels
