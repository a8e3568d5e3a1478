"""student stage and the student trainer: the production run, hidden labels, re-matching, seeding, resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

import mlflow
import numpy as np
import pytest
import torch
from helpers_method_a import staged_project
from helpers_params import config, repo_params

from ms2rgb.flows.stages import run_stage
from ms2rgb.models.bands import RGB_BANDS, S2_BANDS
from ms2rgb.models.classifier import SceneCNN, SceneCNNConfig
from ms2rgb.tasks.config import StudentConfig, VariantName
from ms2rgb.tasks.data.cache import open_split
from ms2rgb.tasks.data.classes import first_k_of_each
from ms2rgb.tasks.errors import PairsTableError
from ms2rgb.tasks.tracking import load_registered_module
from ms2rgb.tasks.training.distill import (
    StudentSet,
    TeacherBank,
    random_partners,
    rematch_epochs,
    rematch_partners,
    teacher_bank,
    train_student,
)
from ms2rgb.tasks.training.store import load_model
from ms2rgb.tasks.training.student_data import StudentInputs
from ms2rgb.tasks.training.variants import FULL_METHOD, VARIANTS


@pytest.fixture
def paired(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> Path:
    return staged_project(tmp_path_factory, "pairs", tmp_path / "project")


def test_student_stage_report_and_mlflow_round_trip(paired: Path) -> None:
    report = run_stage("student", paired)
    assert json.loads((paired / "reports" / "student.json").read_text())["test_accuracy"] == report["test_accuracy"]
    low, high = report["test_accuracy_ci95"]
    assert low <= report["test_accuracy"] <= high and len(report["per_class"]) == 10
    # tiny profile: 4 rgb_train tiles per class, 2 of them labelled
    assert (report["labelled_tiles"], report["unlabelled_tiles"], report["rgb_labels_per_class"]) == (20, 20, 2)
    (only,) = report["rematch_rounds"]  # tiny: one round
    assert 0.0 <= only["changed"] <= 1.0 and 0.0 <= only["pseudo_label_accuracy"] <= 1.0
    assert list((paired / "artifacts" / "student" / "checkpoints").rglob("epoch_*.pt"))
    mlflow.set_tracking_uri(f"sqlite:///{paired / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["ms2rgb"])
    stage = runs[runs["tags.ms2rgb.stage"] == "student"].iloc[0]
    assert stage["metrics.rematch_changed"] == pytest.approx(only["changed"])
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


def test_only_k_labels_per_class_are_shown_and_the_rest_are_hidden(paired: Path) -> None:
    inputs = StudentInputs(paired, repo_params("tiny"))
    data, truth = inputs.data_for(VARIANTS[FULL_METHOD], seed=0, k=1)
    shown = data.labels >= 0
    assert np.array_equal(np.bincount(data.labels[shown], minlength=10), np.ones(10))
    assert np.array_equal(data.labels[shown], truth[shown]) and (data.labels[~shown] == -1).all()
    assert data.weights is not None and (data.weights[shown] == 1).all()
    rgb_only, _ = inputs.data_for(VARIANTS["rgb_only"], seed=0, k=1)
    assert len(rgb_only.labels) == 10 and (rgb_only.labels >= 0).all() and rgb_only.bank is None
    oracle, _ = inputs.data_for(VARIANTS["oracle"], seed=0, k=1)
    assert np.array_equal(oracle.labels, inputs.truth)  # the upper bound sees every label, whatever K


def test_first_k_per_class_keeps_the_prepared_order() -> None:
    labels = np.array([2, 0, 2, 1, 0, 2])
    assert first_k_of_each(labels, 1).tolist() == [True, True, False, True, False, False]
    assert first_k_of_each(labels, None).all()


def test_the_configs_variant_names_are_the_trainers_variants() -> None:
    assert set(get_args(VariantName)) == set(VARIANTS)


def _bank(probs: list[list[float]]) -> TeacherBank:
    p = torch.tensor(probs)
    return TeacherBank(torch.zeros(len(probs), 16, 8, 8), p.log(), p.argmax(1).numpy(), p.max(1).values.numpy())


def _dist(a: float, b: float, eps: float = 1e-3) -> list[float]:
    """Mass a on class 0, b on class 1, eps on the eight others."""
    return [a, b] + [eps] * 8


class _TableStudent(torch.nn.Module):
    """Predicts row v of a table for a tile whose pixels all equal v (so every flip agrees)."""

    def __init__(self, rows: list[list[float]]) -> None:
        super().__init__()
        self.log_probs = torch.nn.Parameter(torch.tensor(rows).log())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_probs[x[:, 0, 0, 0].long()]


def test_rematch_keeps_labelled_tiles_in_class_and_spreads_the_unlabelled_ones() -> None:
    bank = _bank([_dist(0.9, 0.092), _dist(0.6, 0.392), _dist(0.3, 0.692), _dist(0.45, 0.542)])  # 0, 0, 1, 1
    rows = [_dist(0.5, 0.492), _dist(0.48, 0.512), _dist(0.52, 0.472), _dist(0.46, 0.532), _dist(0.5, 0.492)]
    student = _TableStudent(rows)  # every tile is closest to bank row 3
    rgb = np.broadcast_to(np.arange(5, dtype=np.uint8)[:, None, None, None], (5, 3, 8, 8)).copy()
    labels = np.array([0, -1, -1, -1, -1])
    data = StudentSet(rgb, labels, bank, np.zeros(5, np.int64), np.ones(5, np.float32))
    cfg = config("student", temperature=1.0, rematch_epsilon=0.05)
    partners, weights = rematch_partners(student, data, cfg)  # type: ignore[arg-type]
    assert partners[0] == 1  # labelled class 0: the closest tile of its own class, not row 3
    # a plain nearest match would send all four unlabelled tiles to row 3; the balanced one does not
    assert len(set(partners[1:].tolist())) >= 2
    assert weights[0] == 1.0 and (weights[1:] < 1).all() and (weights[1:] > 0).all()
    expected = [rows[i][bank.classes[p]] * bank.confidence[p] for i, p in enumerate(partners) if i > 0]
    np.testing.assert_allclose(weights[1:], expected, rtol=1e-4)


def test_rematch_rounds_are_spread_and_never_after_the_last_epoch() -> None:
    assert rematch_epochs(10, 4) == {2, 4, 6, 8}
    assert rematch_epochs(10, 0) == set()
    assert max(rematch_epochs(3, 5)) < 3


def _toy_setup(labelled: int = 6) -> tuple[SceneCNN, StudentSet, np.ndarray, StudentConfig, SceneCNNConfig]:
    """12 RGB tiles of 3 classes, the first `labelled` with their label, paired with 9 MS tiles."""
    gen = np.random.default_rng(0)
    torch.manual_seed(0)
    teacher = SceneCNN(SceneCNNConfig(bands=S2_BANDS, width=4, stem_stride=2)).eval()
    truth = np.arange(12) % 3
    labels = np.where(np.arange(12) < labelled, truth, -1)
    bank = teacher_bank(teacher, gen.uniform(0, 3000, (9, 13, 16, 16)).astype(np.uint16))
    bank.classes = np.arange(9) % 3  # an untrained teacher's classes are arbitrary; fix them for pairing
    partners = random_partners(truth, bank, seed=0)
    weights = np.linspace(0.2, 1.0, 12).astype(np.float32)
    data = StudentSet(gen.integers(0, 256, (12, 3, 16, 16), dtype=np.uint8), labels, bank, partners, weights)
    cfg = config("student", steps=8, batch_size=4, heads=2, rematch_rounds=1)
    return teacher, data, truth, cfg, SceneCNNConfig(bands=RGB_BANDS, width=4, stem_stride=2, from_8bit=True)


def _weights_equal(a: SceneCNN, b: SceneCNN) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_train_student_is_seeded_and_leaves_the_teacher_alone() -> None:
    teacher, data, truth, cfg, arch = _toy_setup()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    full = VARIANTS[FULL_METHOD]
    first, again = (train_student(full, data, cfg, arch, 5, truth) for _ in range(2))
    assert [h.loss for h in first.history] == [h.loss for h in again.history] and _weights_equal(
        first.model, again.model
    )
    assert len(first.rounds) == 1 and first.terms[0]["feat"] > 0 and first.terms[0]["kd"] > 0
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters()) and not data.bank.feats.requires_grad
    other = train_student(full, data, cfg, arch, 6, truth)
    assert [h.loss for h in other.history] != [h.loss for h in first.history]


def test_hidden_labels_never_reach_the_loss() -> None:
    """Permuting the hidden true classes changes only the scores of the rounds, never the weights;
    showing those labels does change them (so the test would fail if hidden labels leaked)."""
    _, data, truth, cfg, arch = _toy_setup(labelled=6)
    full = VARIANTS[FULL_METHOD]
    lied = truth.copy()
    lied[6:] = (truth[6:] + 1) % 3  # other "true" classes for every hidden tile
    honest, misled = train_student(full, data, cfg, arch, 0, truth), train_student(full, data, cfg, arch, 0, lied)
    assert _weights_equal(honest.model, misled.model)
    assert honest.rounds[0].pseudo_label_accuracy != misled.rounds[0].pseudo_label_accuracy
    shown = StudentSet(data.rgb, truth.copy(), data.bank, data.partners, data.weights)
    assert not _weights_equal(honest.model, train_student(full, shown, cfg, arch, 0, truth).model)


def test_rgb_only_trains_without_a_teacher() -> None:
    _, data, truth, cfg, arch = _toy_setup()
    labelled = data.labels >= 0
    alone = StudentSet(data.rgb[labelled], data.labels[labelled], None, None, None)
    run = train_student(VARIANTS["rgb_only"], alone, cfg, arch, 0, truth[labelled])
    assert all(t["feat"] == 0 and t["kd"] == 0 and t["ce"] > 0 for t in run.terms) and not run.rounds


def test_self_training_adds_its_term_on_unlabelled_tiles() -> None:
    _, data, truth, cfg, arch = _toy_setup()
    cfg = cfg.model_copy(update={"self_training_threshold": 0.05})  # an untrained student is never confident
    plain = StudentSet(data.rgb, data.labels, None, None, None)
    run = train_student(VARIANTS["self_training"], plain, cfg, arch, 0, truth)
    assert any(t["st"] > 0 for t in run.terms) and all(t["kd"] == 0 for t in run.terms)


def test_labelled_tiles_fill_their_share_of_each_epoch() -> None:
    _, data, _, _, _ = _toy_setup(labelled=2)
    visits = data.visits()
    assert (data.labels[visits] >= 0).mean() >= data.labelled_share
    assert set(np.flatnonzero(data.labels < 0)) <= set(visits.tolist())


def test_random_partners_share_the_class_and_follow_the_seed() -> None:
    _, data, truth, _, _ = _toy_setup()
    partners = random_partners(truth, data.bank, seed=1)
    assert (data.bank.classes[partners] == truth).all()
    assert np.array_equal(partners, random_partners(truth, data.bank, seed=1))


class _Crash(Exception):
    pass


def test_a_crashed_student_resumes_to_the_uninterrupted_result_re_matching_included(tmp_path: Path) -> None:
    _, data, truth, cfg, arch = _toy_setup()
    cfg = cfg.model_copy(update={"steps": 24, "rematch_rounds": 3})
    full = VARIANTS[FULL_METHOD]
    straight = train_student(full, data, cfg, arch, 5, truth)
    seen: list[int] = []

    def crash_after_three(trainer: object, stats: object) -> None:
        if len(seen) == 3:
            raise _Crash
        seen.append(1)

    with pytest.raises(_Crash):
        train_student(full, data, cfg, arch, 5, truth, tmp_path, crash_after_three, fingerprint="run-a")
    assert len(list(tmp_path.glob("epoch_*.pt"))) == 1  # only the newest checkpoint is kept
    resumed = train_student(full, data, cfg, arch, 5, truth, tmp_path, fingerprint="run-a")
    assert [h.loss for h in resumed.history] == [h.loss for h in straight.history]
    assert [r.__dict__ for r in resumed.rounds] == [r.__dict__ for r in straight.rounds] and len(resumed.rounds) == 3
    assert resumed.terms == straight.terms and _weights_equal(resumed.model, straight.model)
    # Another run (other fingerprint) never picks up these checkpoints: it starts from scratch.
    other = train_student(full, data, cfg, arch, 5, truth, tmp_path, fingerprint="run-b")
    assert [h.loss for h in other.history] == [h.loss for h in straight.history]


def test_training_accuracy_counts_only_the_tiles_with_a_label() -> None:
    _, data, truth, cfg, arch = _toy_setup(labelled=3)
    run = train_student(VARIANTS[FULL_METHOD], data, cfg, arch, 0, truth)
    # 3 labelled tiles: visited several times per epoch, so the share right is a multiple of 1/visits
    visits = data.visits()
    labelled_visits = int((data.labels[visits] >= 0).sum())
    for stats in run.history:
        assert 0.0 <= stats.accuracy <= 1.0
        assert (stats.accuracy * labelled_visits) == pytest.approx(round(stats.accuracy * labelled_visits))
