"""teacher stage: smoke run on the tiny profile, reproducibility, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import mlflow.pytorch
import numpy as np
import pytest
import torch
from helpers_method_a import staged_project
from helpers_params import config

from ms2rgb.flows.stages import run_stage
from ms2rgb.models.bands import BandMismatchError
from ms2rgb.tasks.data.classes import SCENE_NAMES
from ms2rgb.tasks.errors import BandCountError, DataError, ParamsError
from ms2rgb.tasks.training.store import load_model


@pytest.fixture
def validated(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> Path:
    return staged_project(tmp_path_factory, "validate", tmp_path / "project")


def test_teacher_stage_smoke(validated: Path) -> None:
    report = run_stage("teacher", validated)
    written = json.loads((validated / "reports" / "teacher.json").read_text())
    assert written["test_accuracy"] == report["test_accuracy"] and 0.0 <= report["test_accuracy"] <= 1.0
    assert set(report["per_class"]) == set(SCENE_NAMES)
    assert np.asarray(report["confusion"]).sum() == report["test_tiles"]
    model = load_model(validated / "artifacts" / "teacher" / "model.pt", "scene_cnn", "teacher")
    assert model.feature_channels == 4 * 8  # tiny profile: width 8
    checkpoints = sorted((validated / "artifacts" / "teacher" / "checkpoints").glob("epoch_*.pt"))
    assert [p.name for p in checkpoints] == [f"epoch_{report['epochs'] - 1:03d}.pt"]  # only the newest is kept
    mlflow.set_tracking_uri(f"sqlite:///{validated / 'mlflow.db'}")
    served = mlflow.pytorch.load_model(f"models:/ms2rgb-teacher/{report['model_version']}")
    tiles = torch.from_numpy(np.load(validated / "data" / "prepared" / "test-ms.npy")[:4].astype(np.float32))
    with torch.no_grad():
        torch.testing.assert_close(served(tiles), model(tiles))  # the registry copy predicts as in process
    with pytest.raises(BandMismatchError, match="B8A"):  # an RGB tile handed to the teacher
        model(torch.zeros(1, 3, 64, 64))


def test_same_seed_gives_same_teacher(validated: Path) -> None:
    first = run_stage("teacher", validated)
    weights = torch.load(validated / "artifacts" / "teacher" / "model.pt", weights_only=True)["state_dict"]
    again = run_stage("teacher", validated)
    weights_again = torch.load(validated / "artifacts" / "teacher" / "model.pt", weights_only=True)["state_dict"]
    assert {k: v for k, v in first.items() if k not in ("seconds", "model_version")} == {
        k: v for k, v in again.items() if k not in ("seconds", "model_version")
    }
    assert all(torch.equal(weights[k], weights_again[k]) for k in weights)


@pytest.mark.slow
def test_another_process_with_another_thread_count_gives_the_same_teacher(validated: Path) -> None:
    """Threads are pinned from params.yaml, so the machine's core count cannot change the result."""
    first = run_stage("teacher", validated)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    subprocess.run(
        [str(Path(sys.executable).parent / "ms2rgb"), "stage", "teacher"],
        cwd=validated,
        env=env,
        check=True,
        capture_output=True,
    )
    again = json.loads((validated / "reports" / "teacher.json").read_text())
    assert {k: v for k, v in first.items() if k not in ("seconds", "model_version")} == {
        k: v for k, v in again.items() if k not in ("seconds", "model_version")
    }


def test_band_count_mismatch_in_cache_names_shape_and_fix(validated: Path) -> None:
    cache = validated / "data" / "prepared" / "ms_train-ms.npy"
    tiles = np.load(cache)
    np.save(cache, tiles[:, :3])  # RGB-like tiles where the teacher expects 13 bands
    with pytest.raises(BandCountError, match=r"3 band\(s\).*expects 13.*Fix: point the stage"):
        run_stage("teacher", validated)


def test_missing_teacher_model_says_which_stage_to_run(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="run the teacher stage first"):
        load_model(tmp_path / "model.pt", "scene_cnn", "teacher")


def test_teacher_params_are_checked() -> None:
    with pytest.raises(ParamsError, match="teacher.stem_stride"):
        config("teacher", stem_stride=3)
    with pytest.raises(ParamsError, match="teacher.widht.*valid keys"):
        config("teacher", widht=8)
