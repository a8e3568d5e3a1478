"""compare stage on the tiny profile: the report's schema, its files, and reuse of the production student."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from helpers_method_a import staged_project

from ms2rgb.flows.stages import run_stage

REDUCED = "reduced: {shots: [1], variants: [rgb_only, self_training, full_method], seeds: 2}"


@pytest.fixture
def student_done(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> Path:
    root = staged_project(tmp_path_factory, "student", tmp_path / "project")
    text = (root / "params.yaml").read_text()
    assert REDUCED in text
    # K = 2 is the tiny student's own label budget: full_method there at seed 0 is the production student
    (root / "params.yaml").write_text(text.replace(REDUCED, REDUCED.replace("shots: [1]", "shots: [1, 2]")))
    run_stage("student", root)
    return root


def test_compare_writes_every_variant_at_every_k_and_reuses_the_production_student(
    student_done: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = run_stage("compare", student_done)
    on_disk = json.loads((student_done / "reports" / "compare.json").read_text())
    assert on_disk["by_k"] == report["by_k"] and report["baseline"] == "rgb_only" and report["seeds"] == 2
    assert set(report["by_k"]) == {"1", "2"}
    for cells in report["by_k"].values():
        assert list(cells) == ["rgb_only", "self_training", "full_method"]
        for name, cell in cells.items():
            assert len(cell["per_seed"]) == 2 and cell["mean"] == pytest.approx(sum(cell["per_seed"]) / 2)
            if name != "rgb_only":
                low, high = cell["diff_vs_rgb_only"]["ci95"]
                assert low <= cell["diff_vs_rgb_only"]["mean"] <= high
    student = json.loads((student_done / "reports" / "student.json").read_text())
    assert report["by_k"]["2"]["full_method"]["per_seed"][0] == pytest.approx(student["test_accuracy"])
    assert "full_method/k2/seed0: the production student" in capsys.readouterr().out
    folder = student_done / "reports" / "compare"
    assert {p.name for p in folder.iterdir()} >= {"compare.md", "compare.csv", "accuracy_by_k.png"}
    assert "| 2 | full_method |" in (folder / "compare.md").read_text()
    assert not (student_done / "artifacts" / "compare-reduced.partial").exists()  # scratch checkpoints removed
    mlflow.set_tracking_uri(f"sqlite:///{student_done / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["ms2rgb"])
    run_id = runs[runs["tags.ms2rgb.stage"] == "compare"].iloc[0]["run_id"]
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "compare")}
    assert {"compare/compare.md", "compare/accuracy_by_k.png"} <= logged
