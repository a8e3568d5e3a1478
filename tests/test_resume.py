"""A training stage killed with SIGKILL keeps the stored outputs and resumes to the same result."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers_method_a import staged_project
from mlflow.tracking import MlflowClient

from ms2rgb.flows.stages import run_stage
from ms2rgb.tasks import tracking

pytestmark = pytest.mark.slow
MS2RGB = str(Path(sys.executable).parent / "ms2rgb")
STEPS = 1500  # 300 epochs of the tiny ms_train: long enough to be killed mid-way


def _longer_teacher(root: Path) -> None:
    text = (root / "params.yaml").read_text()
    old = "teacher: {width: 8, steps: 100,"
    assert old in text
    (root / "params.yaml").write_text(text.replace(old, f"teacher: {{width: 8, steps: {STEPS},"))


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _kill_stage_when(root: Path, stage: str, ready: Callable[[Path], bool]) -> None:
    """Start `ms2rgb stage <stage>` and SIGKILL it once `ready(artifacts/<stage>.partial/checkpoints)`."""
    proc = subprocess.Popen(
        [MS2RGB, "--root", str(root), "stage", stage], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    checkpoints = root / "artifacts" / f"{stage}.partial" / "checkpoints"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and not ready(checkpoints):
        time.sleep(0.02)
    assert proc.poll() is None, f"the {stage} stage finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def _five_epochs_done(checkpoints: Path) -> bool:
    done = [int(p.stem.split("_")[1]) for p in checkpoints.glob("epoch_*.pt")]
    return bool(done) and max(done) >= 5


def test_killed_teacher_keeps_the_stored_model_and_resumes_to_the_uninterrupted_result(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    reference = staged_project(tmp_path_factory, "teacher", tmp_path / "reference")
    _longer_teacher(reference)
    uninterrupted = run_stage("teacher", reference)

    root = staged_project(tmp_path_factory, "teacher", tmp_path / "project")
    run_stage("teacher", root)  # the stored teacher and a registered version, before the change
    _longer_teacher(root)
    stored = {p: _digest(root / p) for p in ("artifacts/teacher/model.pt", "reports/teacher.json")}
    tracking.configure(root, "ms2rgb")
    versions = len(MlflowClient().search_model_versions("name='ms2rgb-teacher'"))

    _kill_stage_when(root, "teacher", _five_epochs_done)
    assert {p: _digest(root / p) for p in stored} == stored  # nothing stored was touched
    assert len(MlflowClient().search_model_versions("name='ms2rgb-teacher'")) == versions
    left = [
        r
        for r in MlflowClient().search_runs([MlflowClient().get_experiment_by_name("ms2rgb").experiment_id])
        if r.info.status == "RUNNING"
    ]
    assert len(left) == 1  # the killed stage's run

    resumed = run_stage("teacher", root)
    assert MlflowClient().get_run(left[0].info.run_id).info.status == "KILLED"
    same = {k: v for k, v in uninterrupted.items() if k not in ("seconds", "model_version")}
    assert {k: v for k, v in resumed.items() if k not in ("seconds", "model_version")} == same
    assert json.loads((root / "reports" / "teacher.json").read_text())["test_accuracy"] == same["test_accuracy"]
    assert not (root / "artifacts" / "teacher.partial").exists()  # swapped in
    assert len(list((root / "artifacts" / "teacher" / "checkpoints").glob("epoch_*.pt"))) == 1


TUNE_STEPS = 40  # per tuned seed: the tiny detector then runs long enough to be killed mid-way


def _longer_tuning(root: Path) -> None:
    text = (root / "params.yaml").read_text()
    old = "tune: {max_steps: 2, batch_size: 4, checkpoint_every: 1}"
    assert old in text
    new = f"tune: {{max_steps: {TUNE_STEPS}, batch_size: 4, checkpoint_every: 1, loss_threshold: 0.0}}"
    (root / "params.yaml").write_text(text.replace(old, new))


def _method_only(root: Path) -> None:
    """The tiny profile's `full` grid trains every baseline too; resuming is about the method's seeds,
    and four stage runs of the full grid made this the slowest test in CI (250 s)."""
    text = (root / "params.yaml").read_text()
    old = "grid: full           # every variant, so the stage's tests see them all"
    assert old in text
    (root / "params.yaml").write_text(text.replace(old, "grid: method\n      grids: {method: []}"))


def _one_seed_done_and_another_midway(checkpoints: Path) -> bool:
    finished = {p.parent for p in checkpoints.rglob("last.pt")}
    midway = [p for p in checkpoints.rglob("step*.pt") if p.parent not in finished and int(p.stem[4:]) >= 5]
    return bool(finished and midway)


def _scores(report: dict) -> dict:
    """What a detector run measured, without timings and registry versions."""
    return {
        "miou": report["miou"],
        "baselines": report["baselines"],
        "by_shots": {k: (v["miou"], v["pixel_accuracy"]) for k, v in report["by_shots"].items()},
    }


def _versions(name: str) -> int:
    return len(MlflowClient().search_model_versions(f"name='{name}'"))


def test_killed_detector_keeps_the_stored_one_and_resumes_without_pretraining_again(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    reference = staged_project(tmp_path_factory, "validate", tmp_path / "reference")
    _method_only(reference)
    _longer_tuning(reference)
    uninterrupted = run_stage("detector", reference)

    root = staged_project(tmp_path_factory, "validate", tmp_path / "project")
    _method_only(root)
    run_stage("detector", root)  # the stored detector and registered versions, before the change
    _longer_tuning(root)
    stored = {p: _digest(root / p) for p in ("artifacts/detector/detector.pt", "reports/detector.json")}
    tracking.configure(root, "ms2rgb")
    detectors = _versions("ms2rgb-detector")

    _kill_stage_when(root, "detector", _one_seed_done_and_another_midway)
    assert {p: _digest(root / p) for p in stored} == stored  # nothing stored was touched
    assert _versions("ms2rgb-detector") == detectors
    backbones = _versions("ms2rgb-clip-backbone")  # the killed run pretrained and registered its backbone

    resumed = run_stage("detector", root)
    assert _versions("ms2rgb-clip-backbone") == backbones  # taken from the killed run, not pretrained again
    assert _scores(resumed) == _scores(uninterrupted)
    assert _versions("ms2rgb-detector") == detectors + 1
    assert json.loads((root / "reports" / "detector.json").read_text())["miou"] == uninterrupted["miou"]
    assert not (root / "artifacts" / "detector.partial").exists()  # swapped in
