"""`ms2rgb predict`: a scene-class map per 64-px cell of real GeoTIFFs, read window by window.

The student is a tiny SceneCNN with random weights saved as the student stage saves it: no training.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from helpers_rasters import CRS, recorded_reads, smooth_rgb, write_raster
from rasterio.transform import Affine

from ms2rgb.flows.cli import main as cli_main
from ms2rgb.models.bands import RGB_BANDS, S2_BANDS
from ms2rgb.models.classifier import SceneCNN, SceneCNNConfig
from ms2rgb.tasks import tracking
from ms2rgb.tasks.data.artifacts import model_path
from ms2rgb.tasks.data.classes import SCENE_NAMES
from ms2rgb.tasks.data.render import render_rgb
from ms2rgb.tasks.data.windows import plan_blocks
from ms2rgb.tasks.errors import Ms2rgbError, RasterError
from ms2rgb.tasks.prediction.scene_map import predict
from ms2rgb.tasks.tracking.pyfunc import MODEL_ARTIFACT, SceneClassifierPyfunc
from ms2rgb.tasks.training.store import save_model

CELL = 64
REPO = Path(__file__).resolve().parents[1]
CHAMPION_URI = "models:/ms2rgb-student@champion"  # the champion of the repository's params.yaml


def tiny_student(seed: int = 0, bands: tuple[str, ...] = RGB_BANDS) -> tuple[SceneCNN, SceneCNNConfig]:
    torch.manual_seed(seed)
    cfg = SceneCNNConfig(bands=bands, from_8bit=bands == RGB_BANDS, width=4, dropout=0.0)
    model = SceneCNN(cfg)
    with torch.no_grad():  # spread the BatchNorm statistics so that cells get different classes
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_var.uniform_(0.01, 0.1)
    return model.eval(), cfg


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A project holding only its params.yaml (whose tracking.model_prefix names the registered student)
    and the student stage's model file (no MLflow store)."""
    root = tmp_path / "project"
    model, cfg = tiny_student()
    save_model(model_path(root, "student"), "scene_cnn", model, cfg)
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    return root


def by_hand(model: torch.nn.Module, rgb: np.ndarray) -> np.ndarray:
    """(K, rows, cols) softmax of the model on the 64x64 cells cut out by hand, partial ones edge-padded."""
    _, height, width = rgb.shape
    rows, cols = -(-height // CELL), -(-width // CELL)
    padded = np.pad(rgb, ((0, 0), (0, rows * CELL - height), (0, cols * CELL - width)), mode="edge")
    tiles = [padded[:, r * CELL : (r + 1) * CELL, c * CELL : (c + 1) * CELL] for r in range(rows) for c in range(cols)]
    with torch.no_grad():
        probs = model.eval()(torch.from_numpy(np.stack(tiles).astype(np.float32))).softmax(dim=1).numpy()
    return probs.reshape(rows, cols, -1).transpose(2, 0, 1)


def outputs(result: dict) -> tuple[np.ndarray, np.ndarray]:
    with (
        rasterio.open(result["outputs"]["scenes.tif"]) as classes,
        rasterio.open(result["outputs"]["probabilities.tif"]) as probs,
    ):
        return classes.read(1), probs.read()


def test_outputs_are_georeferenced_per_cell_and_match_the_student(root: Path, tmp_path: Path) -> None:
    rgb = smooth_rgb(150, 200)  # not a multiple of 64: partial cells at the bottom and right are padded
    image = write_raster(tmp_path / "scene.tif", rgb)
    result = predict(image, tmp_path / "out", root=root)
    assert result["model"] == str(model_path(root, "student"))
    assert "no champion" in result["model_note"] and "mlflow.db" in result["model_note"]
    assert not (root / "mlflow.db").exists()  # a reading command creates no store
    assert result["grid"] == {"rows": 3, "cols": 4, "cell_px": 64, "nodata_cells": 0}
    with (
        rasterio.open(image) as src,
        rasterio.open(result["outputs"]["scenes.tif"]) as out,
        rasterio.open(result["outputs"]["probabilities.tif"]) as prob,
    ):
        for dst in (out, prob):
            assert dst.crs == src.crs == rasterio.crs.CRS.from_string(CRS)
            assert dst.transform == src.transform @ Affine.scale(64)
            assert (dst.height, dst.width) == (3, 4)  # ceil(150 / 64), ceil(200 / 64)
        assert out.dtypes == ("uint8",) and out.nodata == 255
        assert out.colormap(1)[0][:3] != out.colormap(1)[1][:3]  # a colour table, one colour per class
        assert prob.count == len(SCENE_NAMES) and set(prob.dtypes) == {"float32"}
        assert prob.descriptions == tuple(SCENE_NAMES)
        classes, probs = out.read(1), prob.read()
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)
    assert np.array_equal(classes, probs.argmax(axis=0))
    student, _ = tiny_student()
    expected = by_hand(student, rgb)
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    assert np.array_equal(classes, expected.argmax(axis=0))
    assert len(np.unique(classes)) > 1  # the check above compares more than one class
    assert sum(result["shares"].values()) == pytest.approx(1.0, abs=1e-3)
    assert Path(result["outputs"]["preview.png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "scene_scene_probs.tif",
        "scene_scenes.png",
        "scene_scenes.tif",
        "scene_scenes.tif.aux.xml",
    ]  # no temporary files left


@pytest.mark.parametrize("budget", [CELL * CELL, 2 * CELL * CELL, 260 * 2 * CELL])
def test_reads_stay_within_the_window_budget(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, budget: int
) -> None:
    """An image far larger than the budget: every read (data and masks) is a window within it, the
    windows tile the image once, and the map equals the one read in a single window."""
    rgb = smooth_rgb(300, 260, seed=1)
    image = write_raster(tmp_path / "big.tif", rgb)
    whole = predict(image, tmp_path / "whole", root=root)
    assert whole["reads"] == 1 and whole["largest_read_px"] == 300 * 260
    with recorded_reads(monkeypatch) as calls:
        windowed = predict(image, tmp_path / "windowed", root=root, window_px=budget)
    assert calls and max(rows * cols for _, rows, cols in calls) <= budget < 300 * 260
    assert sum(rows * cols for name, rows, cols in calls if name == "read") == 300 * 260  # each pixel read once
    assert windowed["largest_read_px"] <= budget and windowed["reads"] > 1
    a, b = outputs(whole), outputs(windowed)
    assert np.array_equal(a[0], b[0])
    np.testing.assert_allclose(a[1], b[1], atol=1e-6)
    assert Path(whole["outputs"]["preview.png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plan_blocks_bounds_every_read_and_covers_the_image() -> None:
    for height, width, budget, halo, align in [
        (300, 260, 4096, 0, 64),
        (1000, 700, 50_000, 63, 64),
        (90, 5000, 40_000, 63, 64),
    ]:
        blocks = plan_blocks(height, width, budget, halo=halo, align=align)
        cover = np.zeros((height, width), int)
        for b in blocks:
            r, c, h, w = int(b.row_off), int(b.col_off), int(b.height), int(b.width)
            cover[r : r + h, c : c + w] += 1
            assert r % align == 0 and c % align == 0
            assert min(height, h + 2 * halo) * min(width, w + 2 * halo) <= budget
        assert (cover == 1).all()
    with pytest.raises(Ms2rgbError, match="window budget 4000 px is too small.*at least 4096 px"):
        plan_blocks(300, 260, 4000, align=64)


def test_13_band_input_gives_the_classes_of_its_rgb_render(root: Path, tmp_path: Path) -> None:
    gen = np.random.default_rng(2)
    coarse = gen.integers(0, 3500, (len(S2_BANDS), 5, 4))
    ms = np.repeat(np.repeat(coarse, 32, axis=1), 32, axis=2)[:, :130, :100] + gen.integers(0, 200, (13, 130, 100))
    ms = ms.astype(np.uint16)
    rendered = write_raster(tmp_path / "rendered.tif", render_rgb(ms))
    as_ms = write_raster(tmp_path / "ms.tif", ms, band_names=S2_BANDS)
    order = np.random.default_rng(3).permutation(len(S2_BANDS))  # band descriptions give the order
    shuffled = write_raster(tmp_path / "shuffled.tif", ms[order], band_names=[S2_BANDS[i] for i in order])
    expected = outputs(predict(rendered, tmp_path / "rgb", root=root))
    for image in (as_ms, shuffled):
        got = outputs(predict(image, tmp_path / image.stem, root=root, window_px=2 * CELL * CELL))
        assert np.array_equal(got[0], expected[0])
        np.testing.assert_allclose(got[1], expected[1], atol=1e-6)


def test_cells_without_valid_pixels_are_nodata(root: Path, tmp_path: Path) -> None:
    rgb = smooth_rgb(128, 192)
    rgb[:, :64, 64:128] = 0  # one whole cell of nodata, and a corner of another
    rgb[:, 64:70, :6] = 0
    image = write_raster(tmp_path / "holes.tif", rgb, nodata=0)
    result = predict(image, tmp_path / "out", root=root)
    classes, probs = outputs(result)
    assert classes[0, 1] == 255 and np.isnan(probs[:, 0, 1]).all()
    assert (np.delete(classes.ravel(), 1) < len(SCENE_NAMES)).all()
    assert result["grid"]["nodata_cells"] == 1


def raster_of(kind: str, path: Path) -> Path:
    if kind == "missing":
        return path / "missing.tif"
    if kind == "text":
        (path / "text.tif").write_text("not a raster")
        return path / "text.tif"
    data = {
        "no_crs": np.zeros((3, 64, 64), np.uint8),
        "one_band": np.zeros((1, 64, 64), np.uint8),
        "rgb_uint16": np.zeros((3, 64, 64), np.uint16),
        "ms_float": np.zeros((13, 64, 64), np.float32),
    }[kind]
    return write_raster(path / f"{kind}.tif", data, crs=None if kind == "no_crs" else CRS)


@pytest.mark.parametrize(
    "kind, match",
    [
        ("missing", r"missing\.tif: file does not exist\. Fix: check the path"),
        ("text", r"text\.tif: cannot be read as a raster .*Fix: give a 3-band uint8 RGB GeoTIFF"),
        ("no_crs", r"no_crs\.tif: has no CRS\. Fix: georeference it first"),
        ("one_band", r"one_band\.tif: has 1 band\(s\) of uint8\. Fix: give a 3-band uint8 RGB"),
        ("rgb_uint16", r"rgb_uint16\.tif: has 3 band\(s\) of uint16\. Fix: .*13-band uint16"),
        ("ms_float", r"ms_float\.tif: has 13 band\(s\) of float32\. Fix:"),
    ],
)
def test_bad_inputs_give_one_line_errors(
    root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str, match: str
) -> None:
    image = raster_of(kind, tmp_path)
    with pytest.raises(RasterError, match=match) as caught:
        predict(image, tmp_path / "out", root=root)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists()  # nothing half-written
    assert cli_main(["--root", str(root), "predict", str(image), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ms2rgb: error: ") and err.count("\n") == 1 and image.name in err


def test_no_model_anywhere_names_the_file_and_the_fix(tmp_path: Path) -> None:
    image = write_raster(tmp_path / "a.tif", smooth_rgb(64, 64))
    with pytest.raises(Ms2rgbError, match=r"no student model: .*artifacts/student/model.pt does not exist") as e:
        predict(image, tmp_path / "out", root=tmp_path / "empty")  # no store either: the file is all there is
    message = str(e.value)
    assert "\n" not in message and "MLFLOW_TRACKING_URI" in message
    assert "ms2rgb stage student" in message and not (tmp_path / "out").exists()
    with pytest.raises(Ms2rgbError, match="window budget 100 px is too small"):
        predict(image, tmp_path / "out", root=tmp_path / "empty", window_px=100)


def test_champion_is_the_default_and_model_picks_a_version(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With load_registered_module stubbed: the champion wins over the file; --model is passed through;
    a registered model that is not an RGB student is refused; no champion is an error, not the file."""
    tracking.configure(root, "ms2rgb")  # the project has a store, so the champion is what it must use
    image = write_raster(tmp_path / "a.tif", smooth_rgb(128, 128))
    asked: list[str] = []
    registered = {
        "models:/ms2rgb-student@champion": tiny_student(seed=5)[0],
        "models:/ms2rgb-student/3": tiny_student(seed=6)[0],
    }

    def load(root_: Path, uri: str) -> torch.nn.Module:
        asked.append(uri)
        if uri not in registered:
            raise Ms2rgbError(f"{uri} could not be loaded: Registered model alias champion not found.")
        return registered[uri]

    monkeypatch.setattr(tracking, "load_registered_module", load)
    champion = predict(image, tmp_path / "champion", root=root)
    assert (champion["model"], champion["model_note"], asked) == (CHAMPION_URI, None, [CHAMPION_URI])
    rgb = smooth_rgb(128, 128)
    np.testing.assert_allclose(outputs(champion)[1], by_hand(tiny_student(seed=5)[0], rgb), atol=1e-5)
    version = predict(image, tmp_path / "v3", root=root, model_uri="models:/ms2rgb-student/3")
    assert version["model"] == "models:/ms2rgb-student/3" and asked[-1] == "models:/ms2rgb-student/3"
    np.testing.assert_allclose(outputs(version)[1], by_hand(tiny_student(seed=6)[0], rgb), atol=1e-5)
    with pytest.raises(Ms2rgbError, match=r"--model 'models:/ms2rgb-student/9': .*not found.*Fix: use models:/"):
        predict(image, tmp_path / "v9", root=root, model_uri="models:/ms2rgb-student/9")
    registered["models:/ms2rgb-teacher/1"] = tiny_student(bands=S2_BANDS)[0]
    with pytest.raises(Ms2rgbError, match=r"reads bands \('B01'.*not the RGB bands"):
        predict(image, tmp_path / "teacher", root=root, model_uri="models:/ms2rgb-teacher/1")
    del registered[CHAMPION_URI]
    with pytest.raises(Ms2rgbError, match=r"alias champion not found\. Fix: .*--model artifacts to use") as caught:
        predict(image, tmp_path / "fallback", root=root)
    assert "\n" not in str(caught.value) and f"sqlite:///{(root / 'mlflow.db').resolve()}" in str(caught.value)
    asked_for = predict(image, tmp_path / "local", root=root, model_uri="artifacts")
    assert (asked_for["model"], asked_for["model_note"]) == (str(model_path(root, "student")), None)


def test_cli_uses_the_registered_champion(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A real MLflow store: without a store the CLI uses the file and says so; with one and no champion it
    stops naming the fix; then it uses the champion once one is set, and the file when asked."""
    image = write_raster(tmp_path / "cli.tif", smooth_rgb(100, 130))
    argv = ["--root", str(root), "predict", str(image), "--out", str(tmp_path / "out")]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert f"model: {model_path(root, 'student')}" in printed and "note: no MLflow store" in printed
    assert "grid: 2 x 3 cells of 64 px" in printed and "cli_scenes.tif" in printed
    champion, cfg = tiny_student(seed=7)
    weights = save_model(tmp_path / "champion" / "model.pt", "scene_cnn", champion, cfg)
    with tracking.stage_run(root, "ms2rgb", "student") as tracker:  # registered the way the student stage registers it
        version = tracker.log_pyfunc_model(
            SceneClassifierPyfunc(),
            {MODEL_ARTIFACT: weights},
            np.zeros((2, 3, 64, 64), np.float32),
            "ms2rgb-student",
            metadata={"class_names": SCENE_NAMES},
        )
    assert version is not None
    capsys.readouterr()  # MLflow's lines about creating the store and logging the model
    assert cli_main(argv) == 2  # a challenger, no champion yet
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "alias champion not found" in err and "--model artifacts" in err
    tracking.set_alias(root, "ms2rgb-student", "champion", int(version))
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert f"model: {CHAMPION_URI}" in printed and "note:" not in printed
    with rasterio.open(tmp_path / "out" / "cli_scene_probs.tif") as probs:
        np.testing.assert_allclose(probs.read(), by_hand(champion, smooth_rgb(100, 130)), atol=1e-5)
    assert cli_main([*argv, "--model", f"models:/ms2rgb-student/{version}"]) == 0
    assert f"model: models:/ms2rgb-student/{version}" in capsys.readouterr().out
    assert cli_main([*argv, "--model", "artifacts"]) == 0
    assert f"model: {model_path(root, 'student')}\n" in capsys.readouterr().out
