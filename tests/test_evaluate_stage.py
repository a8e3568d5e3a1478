"""The evaluate stage on a tiny project: champions set, a later challenger judged, nothing moved by a failure."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import DVC
from helpers_method_a import staged_project
from mlflow.tracking import MlflowClient

from ms2rgb.flows.stages import run_stage
from ms2rgb.tasks import evaluate as evaluate_stage
from ms2rgb.tasks import tracking
from ms2rgb.tasks.config import load_params

pytestmark = pytest.mark.slow
NAMES = ("ms2rgb-teacher", "ms2rgb-matcher", "ms2rgb-student", "ms2rgb-detector")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = staged_project(tmp_path_factory, "student", tmp_path_factory.mktemp("evaluate") / "project")
    run_stage("teacher", root)  # this copy's own store gets every model registered
    run_stage("matcher", root)
    run_stage("pairs", root)
    run_stage("student", root)
    run_stage("detector", root)
    return root, run_stage("evaluate", root)


def champions(root: Path) -> dict[str, int | None]:
    return {name: tracking.version_by_alias(root, name, "champion") for name in NAMES}


def test_first_evaluation_makes_every_version_champion(evaluated: tuple[Path, dict]) -> None:
    root, report = evaluated
    assert set(report["promotion"]) == set(NAMES)
    for name, decision in report["promotion"].items():
        assert decision["decision"] == "first" and decision["champion"] == decision["challenger"]
        assert champions(root)[name] == decision["challenger"]
    student = report["student"]
    low, high = student["accuracy_ci95"]
    assert low <= student["accuracy"] <= high and 0 <= student["ece"] <= 1 and 0 <= student["macro_f1"] <= 1
    assert set(report["detector"]) >= {"miou", "pixel_accuracy", "per_class_iou", "miou_by_k"}
    assert (root / "reports" / "index.html").stat().st_size > 10_000
    assert json.loads((root / "reports" / "evaluate.json").read_text())["student"]["accuracy"] == student["accuracy"]


def test_the_fallback_backbone_follows_its_detector(evaluated: tuple[Path, dict]) -> None:
    root, _ = evaluated
    backbone = tracking.version_by_alias(root, "ms2rgb-clip-backbone", "challenger")
    assert backbone is not None and tracking.version_by_alias(root, "ms2rgb-clip-backbone", "champion") == backbone


def test_promote_by_hand_force_is_recorded(evaluated: tuple[Path, dict]) -> None:
    root, _ = evaluated
    version = run_stage("teacher", root)["model_version"]  # a new version, not yet evaluated
    decision = evaluate_stage.promote_by_hand(root, load_params(root), "ms2rgb-teacher", version, force=True)
    assert (decision.decision, decision.champion) == ("forced", version)
    assert champions(root)["ms2rgb-teacher"] == version
    tags = MlflowClient().get_model_version("ms2rgb-teacher", str(version)).tags
    assert tags["ms2rgb.decision"] == "forced"


def test_dvc_metrics_and_plots_read_the_evaluation(evaluated: tuple[Path, dict]) -> None:
    root, report = evaluated
    shown = subprocess.run(
        [str(DVC), "metrics", "show", "--json"], cwd=root, capture_output=True, text=True, check=True
    ).stdout
    metrics = json.loads(shown)
    flat = json.dumps(metrics)
    assert "reports/evaluate.json" in flat and str(round(report["student"]["accuracy"], 4))[:5] in flat
    plots = subprocess.run([str(DVC), "plots", "show", "--json"], cwd=root, capture_output=True, text=True)
    assert plots.returncode == 0, plots.stderr
    assert "reports/evaluate/reliability.csv" in plots.stdout and "reports/evaluate/miou_by_k.csv" in plots.stdout


def test_a_new_student_is_a_judged_challenger(evaluated: tuple[Path, dict]) -> None:
    root, first = evaluated
    before = champions(root)
    text = (root / "params.yaml").read_text()
    (root / "params.yaml").write_text(text.replace("student: {steps: 6,", "student: {steps: 9,", 1))
    retrained = run_stage("student", root)
    again = run_stage("evaluate", root)
    decision = again["promotion"]["ms2rgb-student"]
    assert decision["challenger"] == retrained["model_version"] != before["ms2rgb-student"]
    assert decision["decision"] in ("promoted", "held") and decision["reasons"]
    expected = decision["challenger"] if decision["decision"] == "promoted" else before["ms2rgb-student"]
    assert champions(root)["ms2rgb-student"] == expected
    assert {n: d["decision"] for n, d in again["promotion"].items() if n != "ms2rgb-student"} == dict.fromkeys(
        ("ms2rgb-teacher", "ms2rgb-matcher", "ms2rgb-detector"), "held"
    )


def test_a_failed_evaluation_moves_no_champion(evaluated: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch) -> None:
    root, _ = evaluated
    run_stage("student", root)  # a new challenger that a finished evaluation might promote
    before = champions(root)

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("killed while writing the report")

    monkeypatch.setattr(evaluate_stage, "report_page", broken)
    with pytest.raises(RuntimeError):
        run_stage("evaluate", root)
    assert champions(root) == before
