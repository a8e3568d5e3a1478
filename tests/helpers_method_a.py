"""A tiny project with method A's upstream stages run once per test session, handed out as copies.

Preparing and training the tiny upstream stages takes tens of seconds; every test that needs
them gets its own copy (without the MLflow store, so each test tracks into a fresh one).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import SHARED_BUILD_PREFIX, make_project

from ms2rgb.flows.stages import run_stage
from ms2rgb.tasks.compare import student_inputs
from ms2rgb.tasks.config import load_params
from ms2rgb.tasks.training.distill import train_student
from ms2rgb.tasks.training.variants import VARIANTS

ORDER = ("prepare", "validate", "teacher", "matcher", "pairs", "student")
_BUILT: dict[str, Path] = {}  # last stage run -> project built in this session
_SKIP = shutil.ignore_patterns("mlflow.db", "mlartifacts", ".git", ".dvc")


def _built(factory: pytest.TempPathFactory, until: str) -> Path:
    """The session's project on which `until` (and every stage before it) has run."""
    if until not in _BUILT:
        index = ORDER.index(until)
        base = factory.mktemp(f"{SHARED_BUILD_PREFIX}{until}") / "project"
        if index == 0:
            make_project(base)
        else:
            shutil.copytree(_built(factory, ORDER[index - 1]), base, ignore=_SKIP)
        run_stage(until, base)
        _BUILT[until] = base
    return _BUILT[until]


def staged_project(factory: pytest.TempPathFactory, until: str, dest: Path) -> Path:
    """Copy to `dest` a tiny project on which every stage up to `until` has run."""
    return shutil.copytree(_built(factory, until), dest, ignore=_SKIP)


def student_weights(root: Path, name: str, seed: int, scratch: Path) -> tuple[int, torch.Tensor]:
    """Every weight of one compare cell's student (K = 1) after training, flattened: far finer than the
    tiny test split's accuracy, which two slightly different students often share; and the process
    that trained it. Module-level, so the worker processes of tests/test_parallel.py can import it."""
    params = load_params(root)
    inputs = student_inputs(root, params, "test")
    data, truth = inputs.data_for(VARIANTS[name], seed, 1)
    run = train_student(VARIANTS[name], data, params.student, inputs.arch, seed, truth, scratch / f"{name}{seed}")
    return os.getpid(), torch.cat([value.flatten().float() for value in run.model.state_dict().values()])
