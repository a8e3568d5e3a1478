"""The registry changes with a stage's outputs or not at all: aliases only after the swap, versions of a
failed stage deleted again."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from torch import nn

from ms2rgb.flows import stages
from ms2rgb.flows.stages import run_stage
from ms2rgb.tasks import tracking
from ms2rgb.tasks.config import Params
from ms2rgb.tasks.data.artifacts import stage_dir, staging_dir

REPO = Path(__file__).resolve().parents[1]
MODEL, EXTRA = "test-model", "test-extra"  # the stage's model, and one a child run registers


class AfterTraining(RuntimeError):
    """What the planted failure raises."""


def registry(root: Path) -> dict[str, tuple[list[int], dict[str, int]]]:
    """Every registered model: (its versions, its aliases) — what a failed stage must leave as it was."""
    tracking.configure(root, "ms2rgb")
    client = MlflowClient()
    out = {}
    for model in client.search_registered_models():
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{model.name}'"))
        out[model.name] = (versions, {alias: int(v) for alias, v in model.aliases.items()})
    return out


def fake_stage(fail: bool, text: str) -> Callable[[Path, Params, tracking.StageTracker], dict[str, Any]]:
    """A training stage in miniature: writes `text` into its staging folder, registers two models, then
    fails or not."""

    def run(root: Path, params: Params, tracker: tracking.StageTracker) -> dict[str, Any]:
        out = staging_dir(root, "fake")
        out.mkdir(parents=True, exist_ok=True)
        (out / "model.txt").write_text(text)
        example = np.zeros((1, 2), np.float32)
        with tracker.child("pretrain") as child:
            child.log_torch_model(nn.Linear(2, 1), example, EXTRA, serialization_format="pickle")
        version = tracker.log_torch_model(nn.Linear(2, 2), example, MODEL, serialization_format="pickle")
        if fail:
            raise AfterTraining("killed after training and registration")
        return {"model_version": int(version or 0)}

    return run


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    return root


def use(monkeypatch: pytest.MonkeyPatch, fail: bool, text: str = "new") -> None:
    monkeypatch.setattr(stages, "stage_function", lambda name: fake_stage(fail, text))


def test_aliases_are_set_only_after_the_outputs_are_swapped_in(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use(monkeypatch, fail=False)
    seen: list[int | None] = []
    swap = stages.swap_in_dir

    def watched(tmp: Path, final: Path) -> Path:
        seen.append(tracking.version_by_alias(root, MODEL, tracking.CHALLENGER))
        return swap(tmp, final)

    monkeypatch.setattr(stages, "swap_in_dir", watched)
    report = run_stage("fake", root)
    assert seen == [None]  # registered, but not yet the challenger while the outputs were swapped in
    assert report["model_version"] == 1
    assert registry(root) == {MODEL: ([1], {"challenger": 1}), EXTRA: ([1], {"challenger": 1})}
    assert (stage_dir(root, "fake") / "model.txt").read_text() == "new"


def test_a_stage_failing_after_registration_leaves_the_registry_unchanged(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use(monkeypatch, fail=False, text="stored")
    run_stage("fake", root)
    tracking.set_alias(root, MODEL, tracking.CHAMPION, 1)
    before = registry(root)
    use(monkeypatch, fail=True, text="failed")
    with pytest.raises(AfterTraining):
        run_stage("fake", root)
    assert registry(root) == before
    assert (stage_dir(root, "fake") / "model.txt").read_text() == "stored"
    use(monkeypatch, fail=False)  # the next good run gets the next number; the deleted ones are not reused
    run_stage("fake", root)
    assert registry(root)[MODEL] == ([1, 3], {"champion": 1, "challenger": 3})


def test_a_failed_swap_deletes_the_versions_and_the_models_it_created(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use(monkeypatch, fail=False)

    def broken(tmp: Path, final: Path) -> Path:
        raise OSError("disk full while swapping the outputs in")

    monkeypatch.setattr(stages, "swap_in_dir", broken)
    with pytest.raises(OSError, match="disk full"):
        run_stage("fake", root)
    assert registry(root) == {}  # the first versions were the stage's: no registered model is left
    assert not stage_dir(root, "fake").exists()


@pytest.mark.slow
def test_the_teacher_failing_after_training_leaves_model_and_registry_as_they_were(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from helpers_method_a import staged_project

    root = staged_project(tmp_path_factory, "validate", tmp_path / "project")
    run_stage("teacher", root)
    before, stored = registry(root), (root / "artifacts" / "teacher" / "model.pt").read_bytes()
    assert before == {"ms2rgb-teacher": ([1], {"challenger": 1})}

    def broken(tmp: Path, final: Path) -> Path:
        raise OSError("disk full while swapping the outputs in")

    monkeypatch.setattr(stages, "swap_in_dir", broken)
    with pytest.raises(OSError, match="disk full"):
        run_stage("teacher", root)  # trained and registered v2 before the swap failed
    assert registry(root) == before
    assert (root / "artifacts" / "teacher" / "model.pt").read_bytes() == stored
