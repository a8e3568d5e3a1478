"""pairs stage: table schema, same-class matching, pseudo-labels for unlabelled pool tiles, bad tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers_method_a import staged_project

from ms2rgb.flows.stages import run_stage
from ms2rgb.tasks.data.cache import open_split
from ms2rgb.tasks.data.classes import SCENE_NAMES
from ms2rgb.tasks.data.pairing import PAIRS_SCHEMA, read_pairs
from ms2rgb.tasks.errors import EmptyPoolError, PairsTableError
from ms2rgb.tasks.pairs import match_within_class

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
    assert table["score"].between(-1.0, 1.0).all()
    probs = np.stack(table["teacher_probs"].to_numpy())  # (N, n_classes)
    assert probs.shape == (len(table), len(SCENE_NAMES)) and np.allclose(probs.sum(1), 1.0, atol=1e-5)
    # Same class: the RGB tile's label is the MS tile's teacher class.
    labels = dict(zip(rgb.ids, rgb.labels))
    assert [SCENE_NAMES[labels[i]] for i in table["rgb_id"]] == table["class"].tolist()
    assert [SCENE_NAMES[c] for c in probs.argmax(1)] == table["class"].tolist()
    assert read_pairs(paired / PAIRS, rgb.ids, pool.ids).shape == (len(rgb.ids),)


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
    best, score = match_within_class(scores, np.array([1, 2, 1]), ms_classes)
    assert best.tolist() == [2, 3, 2]  # row 0 ignores the higher-scoring column 0 (another class)
    assert score.tolist() == pytest.approx([0.5, 0.7, 0.9])


def test_empty_pool_for_a_class_names_it_and_the_fix() -> None:
    with pytest.raises(EmptyPoolError, match=r"\['Forest'\].*Fix: add MS tiles"):
        match_within_class(torch.zeros(2, 2), np.array([0, 1]), np.array([0, 0]))


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
