"""student stage: smoke run with baselines as nested runs, MLflow round trip, re-matching, seeding."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from helpers_method_a import staged_project
from helpers_params import config

from ms2rgb.flows.stages import run_stage
from ms2rgb.models.bands import RGB_BANDS, S2_BANDS
from ms2rgb.models.classifier import SceneCNN, SceneCNNConfig
from ms2rgb.tasks.config import StudentConfig
from ms2rgb.tasks.data.cache import open_split
from ms2rgb.tasks.errors import PairsTableError
from ms2rgb.tasks.tracking import load_registered_module
from ms2rgb.tasks.training.distill import (
    VARIANTS,
    StudentSet,
    TeacherBank,
    Variant,
    budget_epochs,
    random_partners,
    rematch_partners,
    teacher_bank,
    train_student,
)
from ms2rgb.tasks.training.store import load_model

BASELINES = {"rgb_only", "kd_random_pairs", "no_feature_loss", "no_rematch", "paired_kd"}


@pytest.fixture
def paired(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> Path:
    return staged_project(tmp_path_factory, "pairs", tmp_path / "project")


def test_student_stage_report_nested_runs_and_mlflow_round_trip(paired: Path) -> None:
    report = run_stage("student", paired)
    assert json.loads((paired / "reports" / "student.json").read_text())["test_accuracy"] == report["test_accuracy"]
    assert set(report["baselines"]) == BASELINES and report["seeds"] == [0, 1]  # tiny profile: 2 seeds
    for summary in [report["full_method"], *report["baselines"].values()]:
        assert len(summary["per_seed"]) == 2 and summary["mean"] == pytest.approx(np.mean(summary["per_seed"]))
        assert summary["std"] == pytest.approx(np.std(summary["per_seed"], ddof=1))
        assert len(summary["per_class"]) == 10
    assert [r["epoch"] for r in report["rematch_rounds"]] == [1]  # tiny: 2 epochs, re-match every epoch
    assert 0.0 <= report["rematch_rounds"][0]["changed"] <= 1.0
    # every (variant, seed) run keeps only its newest checkpoint, so a killed stage resumes each one
    checkpoints = paired / "artifacts" / "student" / "checkpoints"
    kept = {str(p.parent.relative_to(checkpoints)): p.name for p in checkpoints.rglob("epoch_*.pt")}
    assert set(kept) == {f"{v}/seed{s}" for v in [*BASELINES, "full_method"] for s in (0, 1)}
    assert kept["full_method/seed0"] == "epoch_001.pt"  # tiny: 2 epochs
    mlflow.set_tracking_uri(f"sqlite:///{paired / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["ms2rgb"])
    stage = runs[runs["tags.ms2rgb.stage"] == "student"].iloc[0]
    children = runs[runs["tags.mlflow.parentRunId"] == stage["run_id"]]
    assert set(children["tags.mlflow.runName"]) == {f"student/{v.name}" for v in VARIANTS}
    # The registered student predicts what the model on disk predicts.
    served = load_registered_module(paired, f"models:/ms2rgb-student/{report['model_version']}")
    local = load_model(paired / "artifacts" / "student" / "model.pt", "scene_cnn", "student")
    tiles = torch.from_numpy(np.asarray(open_split(paired / "data" / "prepared", "test", "rgb").images[:6])).float()
    with torch.no_grad():
        torch.testing.assert_close(served(tiles), local(tiles))


def test_student_refuses_a_missing_pairs_table(paired: Path) -> None:
    (paired / "artifacts" / "pairs" / "pairs.parquet").unlink()
    with pytest.raises(PairsTableError, match="pairs table is missing.*Fix: re-run the pairs stage"):
        run_stage("student", paired)


def _constant_student(probs: list[float]) -> SceneCNN:
    """A student whose every prediction is `probs` (all weights zero, head bias = log probs)."""
    student = SceneCNN(SceneCNNConfig(bands=RGB_BANDS, width=4, from_8bit=True)).eval()
    with torch.no_grad():
        for p in student.parameters():
            p.zero_()
        student.head[-1].bias.copy_(torch.tensor(probs).log())
    return student


def _bank(probs: list[list[float]]) -> TeacherBank:
    p = torch.tensor(probs)
    return TeacherBank(torch.zeros(len(probs), 16, 8, 8), p.log(), p, p.argmax(1).numpy(), np.full(len(probs), -1))


def test_rematch_picks_closest_teacher_distribution_within_class() -> None:
    eps = 1e-3

    def dist(a: float, b: float) -> list[float]:  # mass a on class 0, b on class 1, eps elsewhere
        return [a, b] + [eps] * 8

    bank = _bank([dist(0.9, 0.092), dist(0.6, 0.392), dist(0.3, 0.692), dist(0.45, 0.542)])  # classes 0, 0, 1, 1
    student = _constant_student(dist(0.5, 0.492))
    data = StudentSet(np.zeros((2, 3, 8, 8), np.uint8), np.array([0, 1]), bank, np.array([0, 2]))
    assert rematch_partners(student, data, "class").tolist() == [1, 3]  # closest of each tile's own class
    assert rematch_partners(student, data, "pool").tolist() == [3, 3]  # closest overall, class ignored


def _toy_setup() -> tuple[SceneCNN, StudentSet, StudentConfig, SceneCNNConfig]:
    gen = np.random.default_rng(0)
    torch.manual_seed(0)
    teacher = SceneCNN(SceneCNNConfig(bands=S2_BANDS, width=4, stem_stride=2)).eval()
    labels = np.arange(12) % 3
    bank = teacher_bank(teacher, gen.uniform(0, 3000, (9, 13, 16, 16)).astype(np.uint16), np.arange(9) % 3)
    bank.classes = np.arange(9) % 3  # an untrained teacher's classes are arbitrary; fix them for pairing
    data = StudentSet(
        gen.integers(0, 256, (12, 3, 16, 16), dtype=np.uint8), labels, bank, random_partners(labels, bank, seed=0)
    )
    cfg = config("student", epochs=2, batch_size=4, heads=2, rematch_every=1, seeds=1)
    return teacher, data, cfg, SceneCNNConfig(bands=RGB_BANDS, width=4, stem_stride=2, from_8bit=True)


def test_train_student_is_seeded_and_leaves_the_teacher_alone() -> None:
    teacher, data, cfg, arch = _toy_setup()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    full = VARIANTS[0]
    first, again = (train_student(full, data, cfg, arch, seed=5, epochs=2) for _ in range(2))
    assert [h.loss for h in first.history] == [h.loss for h in again.history]
    pairs = zip(first.model.state_dict().values(), again.model.state_dict().values())
    assert all(torch.equal(a, b) for a, b in pairs)
    assert len(first.rounds) == 1 and set(first.terms[0]) == {"feat", "kd", "ce"} and first.terms[0]["feat"] > 0
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters()) and not data.bank.feats.requires_grad
    other = train_student(full, data, cfg, arch, seed=6, epochs=2)
    assert [h.loss for h in other.history] != [h.loss for h in first.history]


def test_rgb_only_trains_without_a_teacher() -> None:
    _, data, cfg, arch = _toy_setup()
    rgb_only = Variant("rgb_only", "none", feature_loss=False, kd=False, rematch=False)
    run = train_student(rgb_only, StudentSet(data.rgb, data.labels, None, None), cfg, arch, seed=0, epochs=2)
    assert all(t["feat"] == 0 and t["kd"] == 0 and t["ce"] > 0 for t in run.terms) and not run.rounds


def test_random_partners_share_the_class_and_follow_the_seed() -> None:
    _, data, _, _ = _toy_setup()
    partners = random_partners(data.labels, data.bank, seed=1)
    assert (data.bank.classes[partners] == data.labels).all()
    assert np.array_equal(partners, random_partners(data.labels, data.bank, seed=1))


def test_budget_epochs_gives_small_sets_equal_optimiser_steps() -> None:
    cfg = config("student", epochs=30, batch_size=64)
    assert budget_epochs(cfg, 600, 600) == 30
    assert budget_epochs(cfg, 600, 80) == 150  # 30 x 10 steps = 150 x 2 steps


class _Crash(Exception):
    pass


def test_a_crashed_student_resumes_to_the_uninterrupted_result_re_matching_included(tmp_path: Path) -> None:
    _, data, cfg, arch = _toy_setup()
    full, epochs = VARIANTS[0], 6
    straight = train_student(full, data, cfg, arch, seed=5, epochs=epochs)

    def crash_after_three(trainer: object, stats: object) -> None:
        if len(straight_run_epochs) == 3:
            raise _Crash
        straight_run_epochs.append(1)

    straight_run_epochs: list[int] = []
    with pytest.raises(_Crash):
        train_student(full, data, cfg, arch, 5, epochs, tmp_path, crash_after_three, fingerprint="run-a")
    assert len(list(tmp_path.glob("epoch_*.pt"))) == 1  # only the newest checkpoint is kept
    resumed = train_student(full, data, cfg, arch, 5, epochs, tmp_path, fingerprint="run-a")
    assert [h.loss for h in resumed.history] == [h.loss for h in straight.history]
    assert [r.__dict__ for r in resumed.rounds] == [r.__dict__ for r in straight.rounds] and len(resumed.rounds) == 5
    assert resumed.terms == straight.terms
    pairs = zip(resumed.model.state_dict().values(), straight.model.state_dict().values())
    assert all(torch.equal(a, b) for a, b in pairs)
    # Another run (other fingerprint) never picks up these checkpoints: it starts from scratch.
    other = train_student(full, data, cfg, arch, 5, epochs, tmp_path, fingerprint="run-b")
    assert [h.loss for h in other.history] == [h.loss for h in straight.history]
