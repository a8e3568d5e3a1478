"""The spine: Prefect flow and `dvc repro` run the same stages and agree on what is stale."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from conftest import DVC, copy_project
from mlflow.tracking import MlflowClient
from prefect.testing.utilities import prefect_test_harness

from ms2rgb.flows.pipeline import pipeline
from ms2rgb.tasks import tracking
from ms2rgb.tasks.data.manifest import SPLITS, make_manifest, write_manifest
from ms2rgb.tasks.errors import ValidationFailed

pytestmark = pytest.mark.slow  # whole pipelines under Prefect and DVC


@pytest.fixture(scope="module", autouse=True)
def prefect_server() -> Iterator[None]:
    """A real, temporary Prefect API server (SQLite) for the flows in this module."""
    with prefect_test_harness(server_startup_timeout=120):
        yield


def dvc_status(root: Path, *targets: str) -> str:
    return subprocess.run([str(DVC), "status", *targets], cwd=root, capture_output=True, text=True, check=True).stdout


def test_prefect_run_leaves_dvc_clean_and_skips_when_fresh(project: Path) -> None:
    reports = pipeline(root=str(project), until="validate")
    assert reports["prepare"]["tiles"] > 0 and reports["validate"]["passed"] is True
    assert json.loads((project / "reports" / "validate.json").read_text())["expectations"] >= 20
    assert (project / "reports" / "validate" / "data_docs" / "index.html").exists()
    assert "up to date" in dvc_status(project, "prepare", "validate")
    again = pipeline(root=str(project), until="validate")
    assert again and all(report is None for report in again.values())


def test_mlflow_has_parent_and_nested_stage_runs(project: Path) -> None:
    pipeline(root=str(project), until="validate")
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["ms2rgb"])
    parent = runs[runs["tags.mlflow.runName"] == "pipeline"].iloc[0]
    children = runs[runs["tags.mlflow.parentRunId"] == parent["run_id"]]
    assert {"prepare", "validate"} <= set(children["tags.ms2rgb.stage"])
    prepare = children[children["tags.ms2rgb.stage"] == "prepare"].iloc[0]
    assert prepare["metrics.tiles"] > 0 and prepare["params.synth.rgb_ambiguity"] == "0.3"
    inputs = mlflow.get_run(prepare["run_id"]).inputs.dataset_inputs
    assert [d.dataset.name for d in inputs] == ["manifest"]
    validate = children[children["tags.ms2rgb.stage"] == "validate"].iloc[0]
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(validate["run_id"])}
    assert {"data_docs", "validation", "validate.json"} <= logged


def test_dvc_repro_then_prefect_skips_everything(reproduced_tiny: Path, tmp_path: Path) -> None:
    project = copy_project(reproduced_tiny, tmp_path / "project")  # `dvc repro` ran the whole pipeline there
    assert json.loads((project / "reports" / "validate.json").read_text())["passed"] is True
    tracking.configure(project, "ms2rgb")
    runs = len(MlflowClient().search_runs([MlflowClient().get_experiment_by_name("ms2rgb").experiment_id]))
    again = pipeline(root=str(project))
    assert again and all(report is None for report in again.values())
    experiment = MlflowClient().get_experiment_by_name("ms2rgb").experiment_id
    assert len(MlflowClient().search_runs([experiment])) == runs  # a run that does nothing leaves no run


def test_new_scene_makes_prepare_stale(project: Path) -> None:
    pipeline(root=str(project), until="prepare")
    (project / "data" / "scenes" / "s1").mkdir()
    write_manifest(make_manifest([]), project / "data" / "scenes" / "s1" / "manifest.parquet")
    assert "prepare" in dvc_status(project)


def test_bad_scene_fails_validation_before_training(project: Path) -> None:
    pipeline(root=str(project), until="validate")
    stamps = project / "reports" / "validate" / "passed"
    assert len(list(stamps.glob("*.json"))) == len(SPLITS)  # what the training stages require
    scene = project / "data" / "scenes" / "broken"
    scene.mkdir(parents=True)
    row = dict(
        id="broken_r0_c0",
        modality="ms",
        path="tiles/missing.tif",
        mask_path=None,
        split="ms_pool",
        source="scene:broken",
        location_id="broken_r0_c0",
        crs="EPSG:32633",
        bounds_left=0.0,
        bounds_bottom=0.0,
        bounds_right=640.0,
        bounds_top=640.0,
        sha256="0" * 64,
        **{"class": None},
    )
    write_manifest(make_manifest([row]), scene / "manifest.parquet")
    with pytest.raises(ValidationFailed, match="broken_r0_c0"):
        pipeline(root=str(project), until="validate")
    report = json.loads((project / "reports" / "validate.json").read_text())
    assert report["passed"] is False and report["failed_count"] >= 1
    assert "validate" in dvc_status(project)  # a failed stage is never recorded as fresh
    assert not list(stamps.glob("*.json"))  # so no training stage runs on the failed data
    assert pd.read_parquet(project / "data" / "prepared" / "manifest.parquet")["id"].str.contains("broken").any()


def test_local_remote_push_and_pull_work_offline(project: Path) -> None:
    pipeline(root=str(project), until="prepare")
    subprocess.run([str(DVC), "push"], cwd=project, check=True, capture_output=True)
    assert any((project / ".dvc-storage").rglob("*"))
    shutil.rmtree(project / "data" / "prepared")
    shutil.rmtree(project / ".dvc" / "cache")
    # Only prepare has run: a bare `dvc pull` would fail on the later stages' never-built outputs.
    subprocess.run([str(DVC), "pull", "prepare"], cwd=project, check=True, capture_output=True)
    assert (project / "data" / "prepared" / "manifest.parquet").exists()
    assert "up to date" in dvc_status(project, "prepare")
