"""Promotion on evidence: a challenger is promoted only when the paired 95 % bootstrap interval of its
headline gain over the champion, on the same held-out tiles, lies above promote.min_gain."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers_params import repo_params
from torch import nn

from ms2rgb.tasks.data.cache import CachedSplit
from ms2rgb.tasks.data.classes import MASK_NODATA, SCENE_NAMES
from ms2rgb.tasks.evaluation.evidence import paired_gain
from ms2rgb.tasks.evaluation.promotion import HELD, PROMOTED, Decision, weigh
from ms2rgb.tasks.evaluation.scoring import Scored, score_classifier
from ms2rgb.tasks.training.metrics import confusion_matrix, iou_report, tile_confusions

PARAMS = repo_params()
RULE = PARAMS.promote
SAMPLES, SEED = 2000, 0
TILES = 600
STUDENT, DETECTOR = "student", "detector"  # model kinds: promotion judges by the stage that trains them


def right_on(count: int, seed: int) -> np.ndarray:
    """(TILES,) 1.0 on `count` tiles drawn at random (seeded), 0.0 elsewhere: one model's per-tile outcomes."""
    outcome = np.zeros(TILES)
    outcome[np.random.default_rng(seed).permutation(TILES)[:count]] = 1.0
    return outcome


def scored(outcomes: np.ndarray) -> Scored:
    """A student scored on TILES tiles, `outcomes` its per-tile correctness (other figures fixed)."""
    return Scored({"accuracy": float(outcomes.mean()), "macro_f1": 0.7, "ece": 0.05}, outcomes)


def judged(new: Scored, old: Scored, kind: str = STUDENT) -> Decision:
    return weigh(kind, 2, new, 1, old, RULE, SAMPLES, SEED)


def test_equal_skill_is_held_even_when_its_point_estimate_is_ahead() -> None:
    champion = right_on(480, seed=1)  # 80 %
    challenger = right_on(486, seed=2)  # 81 % on other tiles: the same skill, a lucky draw
    gain = paired_gain("accuracy", challenger, champion, SAMPLES, SEED)
    assert gain.mean == pytest.approx(0.01) and gain.mean > RULE.min_gain  # a point-estimate rule would promote
    assert gain.low < 0 < gain.high
    decision = judged(scored(challenger), scored(champion))
    assert (decision.decision, decision.champion) == (HELD, 1)
    assert "paired accuracy difference +0.0100, 95 % interval [" in decision.reasons[0]
    assert any("not above promote.min_gain" in reason for reason in decision.reasons)


def test_the_same_outcomes_are_held_with_a_zero_interval() -> None:
    same = right_on(480, seed=1)
    gain = paired_gain("accuracy", same, same, SAMPLES, SEED)
    assert (gain.mean, gain.low, gain.high) == (0.0, 0.0, 0.0)
    assert judged(scored(same), scored(same)).decision == HELD


def test_a_clearly_better_challenger_is_promoted() -> None:
    champion = right_on(480, seed=1)
    challenger = champion.copy()
    challenger[np.flatnonzero(champion == 0)[:60]] = 1.0  # right wherever the champion is, and on 60 tiles more
    decision = judged(scored(challenger), scored(champion))
    assert (decision.decision, decision.champion) == (PROMOTED, 2)
    gain = paired_gain("accuracy", challenger, champion, SAMPLES, SEED)
    assert (
        gain.mean == pytest.approx(0.1)
        and gain.low > 0.05
        and f"[{gain.low:+.4f}, {gain.high:+.4f}]" in (decision.reasons[0])
    )


def test_the_decision_and_its_interval_are_the_same_on_reruns() -> None:
    champion, challenger = right_on(480, seed=1), right_on(500, seed=3)
    first = judged(scored(challenger), scored(champion)).as_dict()
    assert all(judged(scored(challenger), scored(champion)).as_dict() == first for _ in range(3))
    assert paired_gain("accuracy", challenger, champion, SAMPLES, SEED) == paired_gain(
        "accuracy", challenger, champion, SAMPLES, SEED
    )


def test_mismatched_tiles_are_refused() -> None:
    with pytest.raises(ValueError, match="same N > 0 tiles"):
        paired_gain("accuracy", np.ones(5), np.ones(6), SAMPLES, SEED)


# ------------------------------------------------------------- the detector: per-tile confusions, mIoU


def maps(truth: np.ndarray, wrong_share: float, seed: int, classes: int) -> np.ndarray:
    """`truth` with about `wrong_share` of its pixels replaced by random classes (seeded)."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, classes, truth.shape)
    return np.where(rng.random(truth.shape) < wrong_share, noise, truth).astype(np.uint8)


def detector(truth: np.ndarray, pred: np.ndarray, classes: int) -> Scored:
    conf = confusion_matrix(truth, pred, classes, ignore_index=MASK_NODATA)
    report = iou_report(conf, [str(k) for k in range(classes)])
    figures = {"miou": report["miou"], "pixel_accuracy": report["pixel_accuracy"]}
    return Scored(figures, tile_confusions(truth, pred, classes, MASK_NODATA), pred)


def test_per_tile_confusions_add_up_to_the_headline_miou_and_decide_on_it() -> None:
    classes = 4
    truth = np.random.default_rng(0).integers(0, classes, (200, 8, 8)).astype(np.uint8)
    truth[:, 0, 0] = MASK_NODATA  # no-data pixels count nowhere
    champion = detector(truth, maps(truth, 0.4, seed=1, classes=classes), classes)
    equal = detector(truth, maps(truth, 0.4, seed=2, classes=classes), classes)
    better = detector(truth, maps(truth, 0.1, seed=3, classes=classes), classes)
    whole = confusion_matrix(truth, better.maps, classes, ignore_index=MASK_NODATA)
    np.testing.assert_array_equal(better.outcomes.sum(0), whole)
    gain = paired_gain("miou", better.outcomes, champion.outcomes, SAMPLES, SEED)
    assert gain.mean == pytest.approx(better.figures["miou"] - champion.figures["miou"])
    assert judged(equal, champion, DETECTOR).decision == HELD
    decision = judged(better, champion, DETECTOR)
    assert decision.decision == PROMOTED and "paired mIoU difference" in decision.reasons[0]


# ---------------------------------------------------- through score_classifier, with real model outputs


class ReadsLabel(nn.Module):
    """Predicts, for each tile, the class written in its channel `channel` (tiles carry their answers)."""

    def __init__(self, channel: int) -> None:
        super().__init__()
        self.channel = channel
        self.scale = nn.Parameter(torch.tensor(20.0))  # sure of every answer; a parameter to move to a device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        label = x[:, self.channel, 0, 0].long()  # (N,)
        return nn.functional.one_hot(label, len(SCENE_NAMES)).float() * self.scale  # (N, classes)


def test_score_classifier_keeps_per_tile_outcomes_that_decide_promotion() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, len(SCENE_NAMES), TILES)
    guess = [np.where(rng.random(TILES) < 0.8, labels, rng.integers(0, len(SCENE_NAMES), TILES)) for _ in range(2)]
    images = np.zeros((TILES, 3, 2, 2), np.uint8)
    images[:, 0, 0, 0], images[:, 1, 0, 0], images[:, 2, 0, 0] = labels, guess[0], guess[1]
    split = CachedSplit(images, labels, [f"t{i}" for i in range(TILES)], [f"l{i}" for i in range(TILES)], None)
    oracle, first, second = (score_classifier(ReadsLabel(c), split, PARAMS.evaluation, SEED) for c in (0, 1, 2))
    assert oracle.figures["accuracy"] == 1.0 and first.outcomes.mean() == first.figures["accuracy"]
    held = judged(second, first)  # two models of the same skill, wrong on different tiles
    assert held.decision == HELD and any("not above promote.min_gain" in reason for reason in held.reasons)
    assert judged(oracle, first).decision == PROMOTED
