"""`predict` and `detect` never fall back silently: the champion, or the stage's file when asked for
(`--model artifacts`) or when there is no tracking store at all; otherwise one line naming the store and
the fix."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers_rasters import smooth_rgb, write_raster

from ms2rgb.flows.cli import main as cli_main
from ms2rgb.models.bands import RGB_BANDS
from ms2rgb.models.classifier import SceneCNN, SceneCNNConfig
from ms2rgb.tasks import tracking
from ms2rgb.tasks.data.artifacts import model_path
from ms2rgb.tasks.training.store import save_model

DEAD = "http://127.0.0.1:9"  # the discard port: nothing answers
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A project holding its params.yaml (which names its registered models) and the student stage's model
    file, and no detector."""
    root = tmp_path / "project"
    cfg = SceneCNNConfig(bands=RGB_BANDS, from_8bit=True, width=4, dropout=0.0)
    save_model(model_path(root, "student"), "scene_cnn", SceneCNN(cfg).eval(), cfg)
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    return root


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return write_raster(tmp_path / "scene.tif", smooth_rgb(64, 64))


@pytest.fixture
def dead_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", DEAD)
    monkeypatch.setenv(tracking.TIMEOUT_ENV, "1")
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):  # check_reachable sets them
        monkeypatch.delenv(name, raising=False)


def command(root: Path, image: Path, out: Path, name: str, *extra: str) -> list[str]:
    classes = ("--classes", "water,forest") if name == "detect" else ()
    return ["--root", str(root), name, str(image), *classes, "--out", str(out), *extra]


@pytest.mark.parametrize("name", ["predict", "detect"])
def test_an_unreachable_tracking_server_is_one_line_naming_it_and_the_fix(
    name: str, root: Path, image: Path, tmp_path: Path, dead_server: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(command(root, image, tmp_path / "out", name)) == 2
    err = capsys.readouterr().err
    assert err.startswith("ms2rgb: error: ") and err.count("\n") == 1
    assert f"MLflow store {DEAD}" in err and "Fix: start that server" in err and "unset MLFLOW_TRACKING_URI" in err
    assert "--model artifacts" in err
    assert not (tmp_path / "out").exists()  # nothing written, no local model used in its place


def test_model_artifacts_uses_the_file_without_asking_the_server(
    root: Path, image: Path, tmp_path: Path, dead_server: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(command(root, image, tmp_path / "out", "predict", "--model", "artifacts")) == 0
    printed = capsys.readouterr().out
    assert f"model: {model_path(root, 'student')}\n" in printed and "note:" not in printed


def test_model_artifacts_without_the_file_names_the_stage_to_run(
    root: Path, image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(command(root, image, tmp_path / "out", "detect", "--model", "artifacts")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "detector.pt does not exist" in err and "ms2rgb stage detector" in err


def test_without_any_store_the_file_is_used_and_the_result_says_so(
    root: Path, image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(command(root, image, tmp_path / "out", "predict")) == 0
    printed = capsys.readouterr().out
    assert f"model: {model_path(root, 'student')}" in printed and "note: no MLflow store (sqlite:///" in printed
    assert not (root / "mlflow.db").exists()  # reading created no store


@pytest.mark.parametrize("name", ["predict", "detect"])
def test_a_store_without_a_champion_stops_instead_of_using_the_file(
    name: str, root: Path, image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tracking.configure(root, "ms2rgb")  # the project's store exists, and holds no registered model
    capsys.readouterr()  # MLflow's lines about creating it
    assert cli_main(command(root, image, tmp_path / "out", name)) == 2
    err = capsys.readouterr().err
    store = f"sqlite:///{(root / 'mlflow.db').resolve()}"
    assert err.count("\n") == 1 and f"@champion could not be loaded from the MLflow store {store}" in err
    assert "evaluate stage (`ms2rgb run`)" in err and "--model artifacts" in err
    assert not (tmp_path / "out").exists()
