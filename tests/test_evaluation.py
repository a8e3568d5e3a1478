"""Evaluation figures and champion/challenger decisions on constructed cases."""

from __future__ import annotations

import numpy as np
import pytest

from ms2rgb.tasks.evaluation.evidence import Gain
from ms2rgb.tasks.evaluation.promotion import FIRST, FORCED, HELD, PROMOTED, decide
from ms2rgb.tasks.training.metrics import bootstrap_ci, calibration, macro_f1

STUDENT = "student"  # a model kind: promotion judges by the stage that trains it
BASE = {"accuracy": 0.80, "macro_f1": 0.78, "ece": 0.05}
EVIDENT = Gain("accuracy", 0.02, 0.01, 0.03, 1000)  # a paired interval of the gain well above min_gain


def test_bootstrap_interval_contains_the_mean_narrows_with_more_tiles_and_is_seeded() -> None:
    small = np.array([1] * 80 + [0] * 20)
    large = np.tile(small, 25)  # same 0.8 accuracy, 25x the tiles
    low, high = bootstrap_ci(small, 2000, seed=0)
    assert low < 0.8 < high and 0.05 < high - low < 0.25  # ~ +-1.96 * sqrt(.8 * .2 / 100) = +-0.078
    big_low, big_high = bootstrap_ci(large, 2000, seed=0)
    assert big_high - big_low < (high - low) / 3  # 5x narrower in theory (sqrt 25)
    assert bootstrap_ci(small, 2000, seed=0) == (low, high)
    assert bootstrap_ci(np.ones(50), 500, seed=1) == (1.0, 1.0)


def test_calibration_error_of_a_perfectly_and_an_over_confident_model() -> None:
    labels = np.array([0, 0, 1, 1])
    sure_and_right = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert calibration(sure_and_right, labels, bins=10)["ece"] == pytest.approx(0.0)
    sure_and_half_wrong = np.array([[0.9, 0.1], [0.9, 0.1], [0.9, 0.1], [0.9, 0.1]])  # always says 0 at 0.9
    result = calibration(sure_and_half_wrong, labels, bins=10)
    assert result["ece"] == pytest.approx(0.4)  # confidence 0.9, accuracy 0.5
    assert result["reliability"]["count"][8] == 4 and result["reliability"]["accuracy"][8] == 0.5


def test_macro_f1_weights_classes_equally() -> None:
    conf = np.array([[90, 10], [10, 0]])  # the rare class is never right
    assert macro_f1(conf) == pytest.approx((2 * 90 / 200 + 0) / 2)
    assert macro_f1(np.diag([5, 5, 0])) == 1.0  # a class never true is left out


def test_the_first_version_becomes_champion() -> None:
    d = decide(STUDENT, 1, BASE, None, None, 0.001, 0.02)
    assert (d.decision, d.champion, d.challenger) == (FIRST, 1, 1)


def test_an_evident_gain_without_regression_is_promoted() -> None:
    d = decide(STUDENT, 2, {**BASE, "accuracy": 0.82}, 1, BASE, 0.001, 0.02, gain=EVIDENT)
    assert (d.decision, d.champion) == (PROMOTED, 2) and "0.8000 -> 0.8200" in d.reasons[0]
    assert "[+0.0100, +0.0300]" in d.reasons[0]


def test_a_gain_whose_interval_reaches_min_gain_is_held() -> None:
    noisy = Gain("accuracy", 0.02, -0.01, 0.05, 1000)  # the point estimate beats min_gain, the interval does not
    d = decide(STUDENT, 2, {**BASE, "accuracy": 0.82}, 1, BASE, 0.001, 0.02, gain=noisy)
    assert (d.decision, d.champion) == (HELD, 1) and any("not above promote.min_gain" in r for r in d.reasons)


def test_a_champion_to_compare_with_needs_the_paired_gain() -> None:
    with pytest.raises(ValueError, match="paired gain"):
        decide(STUDENT, 2, {**BASE, "accuracy": 0.82}, 1, BASE, 0.001, 0.02)


@pytest.mark.parametrize("worse, key", [({"macro_f1": 0.70}, "macro_f1"), ({"ece": 0.12}, "ece")])
def test_a_regression_of_another_metric_holds_the_champion(worse: dict[str, float], key: str) -> None:
    d = decide(STUDENT, 2, {**BASE, "accuracy": 0.85, **worse}, 1, BASE, 0.001, 0.02, gain=EVIDENT)
    assert (d.decision, d.champion) == (HELD, 1)
    assert any(r.startswith(f"{key} regressed") for r in d.reasons)


def test_force_promotes_whatever_the_figures_and_says_so() -> None:
    d = decide(STUDENT, 2, {**BASE, "accuracy": 0.10}, 1, BASE, 0.001, 0.02, force=True)
    assert (d.decision, d.champion) == (FORCED, 2) and "forced" in d.reasons[0]


def test_the_champion_evaluated_again_is_held() -> None:
    assert decide(STUDENT, 3, BASE, 3, BASE, 0.001, 0.02).decision == HELD
    assert decide(STUDENT, 3, BASE, 3, None, 0.001, 0.02).decision == HELD  # not re-scored: it is the same
