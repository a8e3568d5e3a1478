"""The detector stage on the tiny profile (one shot, two steps) and `ms2rgb detect` on real GeoTIFFs."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
import rasterio
import rasterio.warp
import torch
import yaml
from conftest import make_project
from helpers_params import config
from mlflow.tracking import MlflowClient
from rasterio.transform import from_origin

from ms2rgb.flows.cli import main as cli_main
from ms2rgb.flows.stages import run_stage
from ms2rgb.models.clip_detector import ClassMapDetector
from ms2rgb.tasks.config import merged_params, parse_params
from ms2rgb.tasks.detection.detect import detect
from ms2rgb.tasks.detection.pretrain import prepare_backbone
from ms2rgb.tasks.errors import ParamsError, RasterError, UnknownClassError
from ms2rgb.tasks.tracking import load_torch_model

pytestmark = pytest.mark.slow  # trains the detector stage once per module (about a minute)

REQUIRED = (
    "miou",
    "pixel_accuracy",
    "per_class_iou",
    "trainable_params",
    "train_seconds",
    "tiles_per_second",
    "baselines",
    "weights",
    "stopped_by",
)
COMPARED = {
    "zero_shot", "no_pixel_evidence", "text_prompts", "visual_prompts", "independent", "linear_probe", "meta_net",
    "pixel_forest", "unet", "max_likelihood", "pixel_mlp",
}  # fmt: skip
VARIANTS = {"pretrain", "full_k1", "base_to_novel", *COMPARED}
SEEDS = 2  # the tiny profile's detector.seeds


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict]]:
    """A prepared tiny project with one detector run (fallback pretraining: 2 steps)."""
    root = make_project(tmp_path_factory.mktemp("det") / "project")
    run_stage("prepare", root)
    run_stage("validate", root)
    yield root, run_stage("detector", root)


def set_detector_param(params: dict, dotted: str, value: object) -> None:
    """params["detector"][a][b] = value for dotted = "a.b"."""
    node = params["detector"]
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value


# ---------------------------------------------------------------- the stage


def test_report_holds_the_required_keys_and_outputs(trained: tuple[Path, dict]) -> None:
    root, report = trained
    on_disk = json.loads((root / "reports" / "detector.json").read_text())
    assert on_disk["miou"] == report["miou"] and all(key in on_disk for key in REQUIRED)
    assert set(on_disk["baselines"]) == COMPARED
    # The method carries the shots' pixel evidence with a tuned weight; the seed's method goes without.
    assert isinstance(on_disk["evidence_weight"], float)
    assert on_disk["baseline_details"]["no_pixel_evidence"]["evidence_weight"] is None
    assert all(0.0 <= v <= 1.0 for v in on_disk["baselines"].values())
    for name in COMPARED - {"zero_shot"}:  # every tuned variant: seeds, interval, cost
        detail = on_disk["baseline_details"][name]
        assert len(detail["runs"]) == SEEDS and detail["miou_ci95"][0] <= detail["miou_ci95"][1]
        assert detail["train_seconds"] > 0 and detail["trainable_params"] > 0, name
    novel = on_disk["open_vocabulary"]["novel_classes"]
    assert novel and set(on_disk["open_vocabulary"]) == {"novel_classes", "zero_shot", "full_k1", "base_to_novel"}
    assert set(on_disk["loss_threshold_stops"]) == {"tuning_runs", "stopped_by_threshold", "steps_saved"}
    assert on_disk["trainable_params"] > 0 and on_disk["baseline_details"]["zero_shot"]["trainable_params"] == 0
    assert on_disk["stopped_by"] in ("loss_threshold", "max_steps") and on_disk["steps"] <= 2
    assert set(on_disk["by_shots"]) == {"1"}
    # The comparison at the largest K runs every seed; zero-shot has nothing random to repeat.
    assert on_disk["seeds"] == SEEDS and [r["seed"] for r in on_disk["by_shots"]["1"]["runs"]] == [0, 1]
    assert on_disk["miou"] == pytest.approx(np.mean([r["miou"] for r in on_disk["by_shots"]["1"]["runs"]]), abs=1e-3)
    assert len(on_disk["baseline_details"]["visual_prompts"]["runs"]) == SEEDS
    assert len(on_disk["baseline_details"]["zero_shot"]["runs"]) == 1
    assert set(on_disk["goal"]) == {
        "beats",
        "beats_every_baseline",
        "beats_user_alternatives",
        "points_over_zero_shot",
        "met",
    }
    assert set(on_disk["goal"]["beats"]) == COMPARED
    out = root / "artifacts" / "detector"
    assert {p.name for p in out.iterdir()} >= {"backbone.pt", "detector.pt", "checkpoints"}
    assert {p.name for p in (out / "checkpoints" / "full_k1").iterdir()} == {"seed0", "seed1"}
    assert (out / "checkpoints" / "full_k1" / "seed0" / "last.pt").is_file()


def test_run_records_the_weights_and_registers_both_models(
    trained: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, report = trained
    assert report["weights"].startswith("fallback:ms2rgb-clip-backbone v1 (2 steps on the captions split, dense")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # set_tracking_uri exports it; removed again after the test
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    for name in ("ms2rgb-detector", "ms2rgb-clip-backbone"):
        assert client.search_model_versions(f"name='{name}'"), f"{name} not registered"
    runs = mlflow.search_runs(experiment_names=["ms2rgb"])
    stage = runs[runs["tags.ms2rgb.stage"] == "detector"].iloc[0]
    assert stage["params.clip.weights"] == report["weights"]
    children = runs[runs["tags.mlflow.parentRunId"] == stage["run_id"]]
    assert set(children["tags.ms2rgb.variant"]) == VARIANTS
    full = children[children["tags.ms2rgb.variant"] == "full_k1"].iloc[0]
    assert full["metrics.miou"] == pytest.approx(report["miou"], abs=1e-4)
    by_seed = client.get_metric_history(full["run_id"], "miou_by_seed")
    assert [m.step for m in by_seed] == [0, 1]
    losses = client.get_metric_history(full["run_id"], "train_loss_seed1")
    assert [m.step for m in losses] == list(range(1, report["by_shots"]["1"]["runs"][1]["steps"] + 1))
    pretrain = children[children["tags.ms2rgb.variant"] == "pretrain"].iloc[0]
    assert len(client.get_metric_history(pretrain["run_id"], "pretrain_loss")) == 2
    figures = {a.path for a in client.list_artifacts(stage["run_id"], "figures")}
    assert figures == {f"figures/{n}.png" for n in ("loss_curves", "miou_vs_k", "per_class_iou", "examples")}


def test_registered_detector_loads_and_maps_rgb(trained: tuple[Path, dict]) -> None:
    root, report = trained
    model = load_torch_model(root, f"models:/{report['registered_model']}")
    assert isinstance(model, ClassMapDetector) and model.class_names[0] == "crop"
    assert model.evidence is not None and bool(model.evidence.known.any()), "the pixel evidence was not kept"
    with torch.no_grad():
        logits = model(torch.full((2, 3, 64, 64), 100.0))
    assert logits.shape == (2, len(model.class_names), 64, 64) and torch.isfinite(logits).all()


def test_zero_fallback_steps_refuse_to_tune_random_weights(trained: tuple[Path, dict]) -> None:
    with pytest.raises(ParamsError, match="detector.pretrain.steps=0"):
        prepare_backbone(
            config("detector.clip", pretrained=None),
            config("detector.pretrain", steps=0),
            lambda: None,
            trained[0],
            0,
            torch.device("cpu"),
            tracker=None,
            registered_name="ms2rgb-clip-backbone",
        )


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("tune.lr", -1.0, "detector.tune.lr"),
        ("prompt.colour", 3, "detector.prompt.colour"),
        ("prompt.logit_scale", 0, "detector.prompt.logit_scale"),
        ("seeds", 0, "detector.seeds"),
        ("prompt.depth", 0, "detector.prompt.depth"),
        ("shots", [], "detector.shots"),
        ("zero_shot_template", "no slot", "detector.zero_shot_template"),
    ],
)
def test_bad_detector_params_name_the_key(trained: tuple[Path, dict], key: str, value: object, match: str) -> None:
    params = yaml.safe_load((trained[0] / "params.yaml").read_text())
    set_detector_param(params, key, value)
    with pytest.raises(ParamsError, match=match):
        parse_params(merged_params(params))


def test_pretrained_path_loads_a_saved_checkpoint(trained: tuple[Path, dict], tmp_path: Path) -> None:
    """clip.pretrained naming a state-dict file: no fallback pretraining, the file's weights are used."""
    root = make_project(tmp_path / "project")
    shutil.copytree(trained[0] / "data", root / "data", dirs_exist_ok=True)
    shutil.copytree(trained[0] / "reports" / "validate" / "passed", root / "reports" / "validate" / "passed")
    (root / "weights").mkdir()
    shutil.copy(trained[0] / "artifacts" / "detector" / "backbone.pt", root / "weights" / "my_clip.pt")
    params = yaml.safe_load((root / "params.yaml").read_text())
    set_detector_param(params, "clip.pretrained", "weights/my_clip.pt")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    report = run_stage("detector", root)
    assert report["weights"] == "file:my_clip.pt" and report["pretrain_seconds"] == 0.0
    assert not (root / "artifacts" / "detector" / "backbone.pt").exists()
    # Same backbone, same seed, same budget: the zero-shot score equals the fallback run's.
    assert report["baselines"]["zero_shot"] == trained[1]["baselines"]["zero_shot"]
    image = rgb_tif(tmp_path / "in.tif", 64, 64)
    assert detect(image, "water,forest", tmp_path / "out", root=root, model_uri="artifacts")["polygons"] > 0


# ---------------------------------------------------------------- ms2rgb detect

CRS = "EPSG:32633"
LOCAL = "artifacts"  # the stage's own detector: the stage ran, no evaluate made a champion
TRANSFORM = from_origin(600000.0, 5100000.0, 10.0, 10.0)


def rgb_tif(
    path: Path,
    height: int,
    width: int,
    count: int = 3,
    dtype: str = "uint8",
    crs: str | None = CRS,
    nodata: int | None = None,
) -> Path:
    gen = np.random.default_rng(0)
    high = 255 if dtype == "uint8" else 3000
    data = gen.integers(0, high, (count, height, width)).astype(dtype)
    data[:, : height // 2] //= 3  # two regions of different brightness
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=width,
        height=height,
        count=count,
        dtype=dtype,
        crs=crs,
        transform=TRANSFORM,
        nodata=nodata,
    ) as dst:
        dst.write(data)
    return path


@pytest.mark.parametrize("count, dtype", [(3, "uint8"), (13, "uint16")])
def test_detect_writes_georeferenced_outputs(
    trained: tuple[Path, dict], tmp_path: Path, count: int, dtype: str
) -> None:
    image = rgb_tif(tmp_path / "scene.tif", 100, 150, count, dtype)  # not a multiple of the 64-px window
    result = detect(image, "water, forest,River, red tiled roofs", tmp_path / "out", root=trained[0], model_uri=LOCAL)
    with rasterio.open(image) as src, rasterio.open(result["outputs"]["classes.tif"]) as out:
        assert (out.crs, out.transform, out.width, out.height) == (src.crs, src.transform, src.width, src.height)
        classes = out.read(1)
        assert out.dtypes == ("uint8",) and classes.max() < 4
        assert json.loads(out.tags()["classes"]) == {"0": "water", "1": "forest", "2": "River", "3": "red tiled roofs"}
        west, south, east, north = rasterio.warp.transform_bounds(src.crs, "EPSG:4326", *src.bounds)
    assert Path(result["outputs"]["overlay.png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    geojson = json.loads(Path(result["outputs"]["classes.geojson"]).read_text())
    assert geojson["type"] == "FeatureCollection" and len(geojson["features"]) == result["polygons"] > 0
    names = {f["properties"]["class"] for f in geojson["features"]}
    assert names == {["water", "forest", "River", "red tiled roofs"][i] for i in np.unique(classes)}
    points = np.array([p for f in geojson["features"] for ring in f["geometry"]["coordinates"] for p in ring])
    eps = 1e-6
    assert points[:, 0].min() >= west - eps and points[:, 0].max() <= east + eps
    assert points[:, 1].min() >= south - eps and points[:, 1].max() <= north + eps
    assert sum(result["shares"].values()) == pytest.approx(1.0, abs=1e-3)  # shares are rounded


def test_detect_marks_nodata_pixels(trained: tuple[Path, dict], tmp_path: Path) -> None:
    image = rgb_tif(tmp_path / "holes.tif", 64, 64, nodata=0)
    with rasterio.open(image, "r+") as dst:
        block = dst.read()
        block[:, :10, :10] = 0
        dst.write(block)
    result = detect(image, "water,forest", tmp_path / "out", root=trained[0], model_uri=LOCAL)
    with rasterio.open(result["outputs"]["classes.tif"]) as out:
        classes = out.read(1)
        assert out.nodata == 255 and (classes[:10, :10] == 255).all() and (classes[20:] < 2).all()


def test_detect_with_a_registered_model_uri(trained: tuple[Path, dict], tmp_path: Path) -> None:
    root, report = trained
    image = rgb_tif(tmp_path / "a.tif", 64, 64)
    local = detect(image, "water,forest", tmp_path / "local", root=root, model_uri=LOCAL)
    remote = detect(
        image, "water,forest", tmp_path / "remote", root=root, model_uri=f"models:/{report['registered_model']}"
    )
    assert remote["model"] == f"models:/{report['registered_model']}"
    with rasterio.open(local["outputs"]["classes.tif"]) as a, rasterio.open(remote["outputs"]["classes.tif"]) as b:
        assert np.array_equal(a.read(), b.read())  # the registry holds the same tuned prompts


@pytest.mark.parametrize(
    "make, classes, error, match",
    [
        (lambda p: p / "missing.tif", "water", RasterError, "does not exist"),
        (lambda p: rgb_tif(p / "one.tif", 64, 64, count=1), "water", RasterError, "1 band"),
        (lambda p: rgb_tif(p / "u16.tif", 64, 64, dtype="uint16"), "water", RasterError, "3 band.*uint16"),
        (lambda p: rgb_tif(p / "nocrs.tif", 64, 64, crs=None), "water", RasterError, "no CRS"),
        (lambda p: rgb_tif(p / "ok.tif", 64, 64), "water,zebra", UnknownClassError, "'zebra'.*'water'"),
    ],
)
def test_detect_rejects_bad_input(
    trained: tuple[Path, dict], tmp_path: Path, make, classes: str, error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        detect(make(tmp_path), classes, tmp_path / "out", root=trained[0], model_uri=LOCAL)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_detect_cli_reports_errors_and_outputs(
    trained: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = rgb_tif(tmp_path / "cli.tif", 64, 64)
    assert (
        cli_main(["--root", str(trained[0]), "detect", str(image), "--classes", "", "--out", str(tmp_path / "o")]) == 2
    )
    assert "names no class" in capsys.readouterr().err
    assert (
        cli_main(
            [
                *("--root", str(trained[0]), "detect", str(image), "--classes", "water,soil"),
                *("--out", str(tmp_path / "o"), "--model", LOCAL),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "cli_classes.tif" in printed and "class shares: water" in printed
