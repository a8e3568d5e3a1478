"""Quality floors: both methods, trained as the stages train them on the `floors` profile, must still work.

Other tests check that scores lie in [0, 1], which a broken model passes too. These fail when a
method stops doing what it is for: the teacher must classify MS tiles far above chance, the
matcher must rank true partners far above chance, the full method must beat `rgb_only` at K = 5,
and tuned prompts must beat zero-shot. Everything is seeded (params seed 0; `threads` pins torch's
CPU threads), so on one machine a run gives the same numbers every time.

How the floors were set: each experiment was run on the `floors` profile with params seeds 0-4
(the seed draws the synthetic data and every initialisation), on 2 CPU cores; each floor sits
below the worst of those five seeds by the margin stated beside it, so that ordinary seed-to-seed
spread passes and a method that stopped working fails. The measured values are written next to
each floor; re-measure them (`seed` in `repo_params("floors", seed=s)`) when a method or the
profile changes on purpose. About 2 minutes on 2 cores, so marked `slow`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers_floors import METHOD_A, detector_miou, run_untracked
from helpers_params import repo_params

from ms2rgb.tasks.config import Params
from ms2rgb.tasks.data.classes import SCENE_NAMES

pytestmark = pytest.mark.slow

# Teacher, MS test accuracy (400 tiles, chance 0.10). Seeds 0-4: 1.000 1.000 0.9975 0.9975 1.000.
TEACHER_MIN_ACCURACY = 0.90  # 0.0975 below the worst seed
# Matcher, pair_top5 on pair_test (40 pairs: chance 5/40 = 0.125). Seeds 0-4: 0.900 0.775 0.875 0.725 0.775.
MATCHER_MIN_TOP5 = 0.45  # 0.275 below the worst seed (about 4 binomial standard errors of 40 pairs)
# full_method minus rgb_only, RGB test accuracy at K = 5 (400 tiles, same seed). Seeds 0-4:
# +0.1025 (0.715 vs 0.6125), +0.100 (0.7025 vs 0.6025), +0.175 (0.6825 vs 0.5075),
# +0.120 (0.655 vs 0.535), +0.1175 (0.695 vs 0.5775); the low end of the paired 95 % interval
# (compare's bootstrap over test tiles): 0.0575 0.050 0.1275 0.0725 0.080. With the distillation
# terms multiplied by 0 (a planted bug), seed 0 gave +0.0325, interval [-0.01, 0.07]: the unlabelled
# tiles still shape the batch statistics, so a broken method does not fall all the way to rgb_only.
FULL_METHOD_MIN_GAIN = 0.06  # 0.04 below the worst seed
FULL_METHOD_MIN_CI_LOW = 0.0  # the gain is evidence, not noise; 0.05 below the worst seed
# Coupled prompts tuned at K = 8 minus zero-shot, mIoU on seg_test (80 tiles), on the backbone pretrained
# with the dense term (detector.pretrain.dense_weight 1). Seeds 0-4: +0.029 (0.379 vs 0.350),
# +0.180 (0.420 vs 0.240), +0.001 (0.353 vs 0.352), +0.067 (0.385 vs 0.319), +0.110 (0.408 vs 0.299).
# The dense term lifts zero-shot so much that on seed 2 the prompts only draw level (60 tuning steps:
# +0.015), so this floor is the "above zero-shot" with no margin for every seed; the test runs
# seed 0. With the prompts never updated (a planted bug), the tuned model falls below zero-shot.
DETECTOR_MIN_GAIN = 0.0
# The full method (coupled prompts + pixel evidence) minus the per-pixel forest, same K = 8 shots.
# With the Gaussian evidence: seed 0 +0.019 (0.631 vs 0.612), seed 1 +0.026 (0.708 vs 0.682). With
# the per-pixel network (the default since it wins on real scene tiles, 0.866 vs 0.830): seed 0
# -0.003 (0.609 vs 0.612). Floor: level with the forest within one point (the 95 % intervals of these
# runs span about 12 points); without the evidence the prompts score 0.379, far below it.
EVIDENCE_MIN_GAP_TO_FOREST = -0.01


@pytest.fixture(scope="module")
def params() -> Params:
    return repo_params("floors", seed=0)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, params: Params) -> Path:
    """A project folder holding the floors profile's synthetic data, prepared and stamped."""
    root = tmp_path_factory.mktemp("floors") / "project"
    root.mkdir()
    run_untracked(METHOD_A[0], root, params)
    return root


@pytest.fixture(scope="module")
def method_a(prepared: Path, params: Params) -> dict[str, dict[str, Any]]:
    """Reports of teacher, matcher, pairs, student and compare, run in that order on `prepared`."""
    return {name: run_untracked(name, prepared, params) for name in METHOD_A[1:]}


def test_teacher_is_well_above_chance(method_a: dict[str, dict[str, Any]]) -> None:
    report = method_a["teacher"]
    assert report["test_accuracy"] >= TEACHER_MIN_ACCURACY, (
        f"teacher MS test accuracy {report['test_accuracy']:.4f} < floor {TEACHER_MIN_ACCURACY} "
        f"(chance {1 / len(SCENE_NAMES):.2f})"
    )


def test_matcher_top5_is_well_above_chance(method_a: dict[str, dict[str, Any]]) -> None:
    report = method_a["matcher"]
    chance = 5 / report["test_pairs"]
    assert 3 * chance < MATCHER_MIN_TOP5  # the floor itself means something on this many pairs
    assert report["pair_top5"] >= MATCHER_MIN_TOP5, (
        f"matcher pair_top5 {report['pair_top5']:.4f} < floor {MATCHER_MIN_TOP5} (chance {chance:.3f})"
    )


def test_full_method_beats_rgb_only_at_k5(method_a: dict[str, dict[str, Any]]) -> None:
    cells = method_a["compare"]["by_k"]["5"]
    full, baseline = cells["full_method"]["mean"], cells["rgb_only"]["mean"]
    low, high = cells["full_method"]["diff_vs_rgb_only"]["ci95"]
    gain = full - baseline
    assert gain >= FULL_METHOD_MIN_GAIN and low > FULL_METHOD_MIN_CI_LOW, (
        f"full_method {full:.4f} - rgb_only {baseline:.4f} = {gain:+.4f} at K = 5, paired 95 % interval "
        f"[{low:+.4f}, {high:+.4f}]; floors: gain >= {FULL_METHOD_MIN_GAIN}, interval above {FULL_METHOD_MIN_CI_LOW}"
    )


@pytest.fixture(scope="module")
def detector_scores(prepared: Path, params: Params) -> dict[str, float]:
    return detector_miou(prepared, params)


def test_tuned_prompts_beat_zero_shot(detector_scores: dict[str, float]) -> None:
    miou = detector_scores
    gain = miou["coupled"] - miou["zero_shot"]
    assert gain > DETECTOR_MIN_GAIN, (
        f"coupled prompts mIoU {miou['coupled']:.4f} - zero-shot {miou['zero_shot']:.4f} = {gain:+.4f} "
        f"is not above {DETECTOR_MIN_GAIN}"
    )


def test_pixel_evidence_lifts_the_method_level_with_the_forest(detector_scores: dict[str, float]) -> None:
    miou = detector_scores
    gap = miou["with_evidence"] - miou["pixel_forest"]
    assert miou["with_evidence"] > miou["coupled"] and gap >= EVIDENCE_MIN_GAP_TO_FOREST, (
        f"method with pixel evidence mIoU {miou['with_evidence']:.4f}, prompts alone {miou['coupled']:.4f}, "
        f"pixel forest {miou['pixel_forest']:.4f}: {gap:+.4f} to the forest; floor {EVIDENCE_MIN_GAP_TO_FOREST:+.4f}"
    )
