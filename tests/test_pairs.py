"""pairs stage: table schema, same-class matching, pseudo-labels for unlabelled pool tiles, bad tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers_method_a import staged_project

from ms2rgb.flows.stages import run_stage
from ms2rgb.models.assignment import class_posterior, sinkhorn_plan
from ms2rgb.tasks.config import PairsConfig
from ms2rgb.tasks.data.cache import open_split
from ms2rgb.tasks.data.classes import SCENE_NAMES
from ms2rgb.tasks.data.pairing import PAIRS_SCHEMA, read_pairs
from ms2rgb.tasks.errors import EmptyPoolError, PairsTableError
from ms2rgb.tasks.pairs import assign_without_labels, match_within_class

PAIRS = Path("artifacts") / "pairs" / "pairs.parquet"


@pytest.fixture
def paired(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> Path:
    return staged_project(tmp_path_factory, "pairs", tmp_path / "project")


def test_pairs_table_schema(paired: Path) -> None:
    table = pd.read_parquet(paired / PAIRS)
    rgb = open_split(paired / "data" / "prepared", "rgb_train", "rgb")
    pool = open_split(paired / "data" / "prepared", "ms_pool", "ms")
    assert list(table.columns) == list(PAIRS_SCHEMA)
    assert sorted(table["rgb_id"]) == sorted(rgb.ids) and set(table["ms_id"]) <= set(pool.ids)
    assert table["score"].between(-1.0, 1.0).all() and table["confidence"].between(0.0, 1.0).all()
    probs = np.stack(table["teacher_probs"].to_numpy())  # (N, n_classes), the free partner's
    assert probs.shape == (len(table), len(SCENE_NAMES)) and np.allclose(probs.sum(1), 1.0, atol=1e-5)
    # The free partner's pseudo-label is its teacher class; `class` is the RGB tile's own label.
    assert [SCENE_NAMES[c] for c in probs.argmax(1)] == table["match_class"].tolist()
    labels = dict(zip(rgb.ids, rgb.labels))
    assert [SCENE_NAMES[labels[i]] for i in table["rgb_id"]] == table["class"].tolist()
    pairing = read_pairs(paired / PAIRS, rgb.ids, pool.ids)
    assert pairing.free.shape == pairing.same_class.shape == pairing.confidence.shape == (len(rgb.ids),)


def test_the_report_scores_the_label_free_pairs_with_the_hidden_labels(paired: Path) -> None:
    report = run_stage("pairs", paired)
    table = pd.read_parquet(paired / PAIRS)
    assert report["same_class_rate"] == pytest.approx((table["match_class"] == table["class"]).mean())
    assert report["distinct_ms_tiles"] == table["ms_id"].nunique()
    assert 0 < report["largest_share_of_one_ms_tile"] <= 1


def test_unlabelled_pool_tiles_are_paired_through_teacher_pseudo_labels(paired: Path) -> None:
    index_path = paired / "data" / "prepared" / "ms_pool-ms-index.parquet"  # what open_split reads
    index = pd.read_parquet(index_path)
    index["class"] = None  # as if every pool tile came from a scene
    index.to_parquet(index_path, index=False)
    report = run_stage("pairs", paired)
    assert report["pseudo_labelled_tiles"] == report["pool_tiles"] and report["pairs"] > 0
    assert report["same_class_rate_true"] is None and report["pool_teacher_accuracy"] is None
    assert pd.read_parquet(paired / PAIRS)["ms_true_class"].isna().all()


def test_match_within_class_takes_best_score_of_own_class() -> None:
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.2], [0.8, 0.3, 0.2, 0.7], [0.1, 0.6, 0.9, 0.4]])
    ms_classes = np.array([0, 1, 1, 2])
    best, score, _ = match_within_class(scores, np.array([1, 2, 1]), ms_classes)
    assert best.tolist() == [2, 3, 2]  # row 0 ignores the higher-scoring column 0 (another class)
    assert score.tolist() == pytest.approx([0.5, 0.7, 0.9])


def test_the_assignment_spreads_over_the_pool_where_argmax_piles_onto_a_hub() -> None:
    # MS tile 0 is every RGB tile's best match (a hub); tiles 1-3 are each a close second for one.
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.1], [0.9, 0.1, 0.8, 0.1], [0.9, 0.1, 0.1, 0.8], [0.9, 0.5, 0.5, 0.5]])
    assert scores.argmax(1).tolist() == [0, 0, 0, 0]
    plan = sinkhorn_plan(scores / 0.05, iters=200)
    assert torch.allclose(plan.sum(1), torch.ones(4), atol=1e-5)
    assert sorted(plan.argmax(1).tolist()) == [0, 1, 2, 3]  # one RGB tile per MS tile
    assert plan.argmax(1).tolist()[:3] == [1, 2, 3]  # each takes its own close second


def test_label_free_pairing_follows_the_matcher_and_its_confidence_follows_the_class_mass() -> None:
    # Two classes of MS tiles (teacher: 0, 0, 1, 1). RGB tile 0 scores class-0 tiles high, tile 1
    # class-1 tiles, tile 2 both alike: its partner's class is a coin flip, so its confidence is low.
    scores = torch.tensor([[0.9, 0.8, 0.0, 0.1], [0.0, 0.1, 0.9, 0.8], [0.5, 0.5, 0.5, 0.5]])
    teacher = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9], [0.2, 0.8]])
    free = assign_without_labels(
        scores, teacher, PairsConfig(batch_size=4, temperature=0.1, sinkhorn_iters=50, chunk_tiles=8)
    )
    assert free.partner[0] in (0, 1) and free.partner[1] in (2, 3)
    assert free.confidence[2] < 0.6 < min(free.confidence[0], free.confidence[1])
    assert free.confidence.max() <= 0.9 + 1e-6  # never above the teacher's own confidence
    posterior = class_posterior(sinkhorn_plan(scores / 0.1, 50), teacher.argmax(1), 2)
    assert torch.allclose(posterior.sum(1), torch.ones(3), atol=1e-5)


def test_a_class_without_pool_tiles_falls_back_to_the_whole_pool_and_is_named() -> None:
    scores = torch.tensor([[0.9, 0.1, 0.2], [0.1, 0.3, 0.8]])  # RGB tile 1 (Forest) scores pool tile 2 best
    best, score, fallback = match_within_class(scores, np.array([0, 1]), np.array([0, 0, 0]))
    assert fallback == ("Forest",) and best.tolist() == [0, 2] and score[1] == pytest.approx(0.8)
    assert match_within_class(scores, np.array([0, 0]), np.array([0, 0, 0]))[2] == ()
    with pytest.raises(EmptyPoolError, match=r"pool is empty.*Fix: add MS tiles"):
        match_within_class(torch.zeros(2, 0), np.array([0, 1]), np.array([], dtype=np.int64))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda t: t.assign(ms_id=["ghost_ms"] + t["ms_id"].tolist()[1:]), r"ms_id\(s\) are not in.*ghost_ms"),
        (lambda t: t.assign(rgb_id=["ghost_rgb"] + t["rgb_id"].tolist()[1:]), r"rgb_id\(s\) are not in.*ghost_rgb"),
        (lambda t: t.iloc[1:], "1 RGB training tile"),
        (lambda t: t.drop(columns="teacher_probs"), r"columns \['teacher_probs'\] are missing"),
    ],
)
def test_broken_pairs_table_is_refused(paired: Path, damage, message: str) -> None:
    rgb = open_split(paired / "data" / "prepared", "rgb_train", "rgb")
    pool = open_split(paired / "data" / "prepared", "ms_pool", "ms")
    damage(pd.read_parquet(paired / PAIRS)).to_parquet(paired / PAIRS)
    with pytest.raises(PairsTableError, match=f"{message}.*Fix: re-run the pairs stage"):
        read_pairs(paired / PAIRS, rgb.ids, pool.ids)
