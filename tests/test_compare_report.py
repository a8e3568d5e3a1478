"""Method A comparison: the paired bootstrap (tasks/training/metrics.py) and the report pieces built
on it (tasks/report/compare.py), on constructed correctness arrays whose answers are known by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ms2rgb.tasks.report.compare import (
    TABLE_COLUMNS,
    accuracy_by_k_figure,
    compare_markdown,
    compare_summary,
    compare_table,
    k_axis,
)
from ms2rgb.tasks.training import metrics
from ms2rgb.tasks.training.metrics import bootstrap_ci, paired_bootstrap_diff

# ---------------------------------------------------------------- paired bootstrap


def bernoulli(rng: np.random.Generator, p: float, shape: tuple[int, ...]) -> np.ndarray:
    return (rng.random(shape) < p).astype(np.float64)


def better_on(b: np.ndarray, tiles: int, rng: np.random.Generator) -> np.ndarray:
    """`b` with `tiles` of its wrong tiles per seed made right: a beats b on exactly those."""
    a = b.copy()
    for s in range(len(b)):
        a[s, rng.choice(np.flatnonzero(b[s] == 0), tiles, replace=False)] = 1.0
    return a


def test_identical_variants_differ_by_exactly_zero() -> None:
    a = bernoulli(np.random.default_rng(0), 0.7, (3, 200))
    assert paired_bootstrap_diff(a, a.copy(), 500, seed=0) == {"mean": 0.0, "ci95": [0.0, 0.0]}


def test_a_constant_gain_on_every_tile_has_a_point_interval() -> None:
    b = bernoulli(np.random.default_rng(1), 0.5, (2, 300))
    assert paired_bootstrap_diff(b + 1.0, b, 500, seed=0) == {"mean": 1.0, "ci95": [1.0, 1.0]}


def test_a_gain_on_ten_percent_of_tiles_is_found() -> None:
    rng = np.random.default_rng(2)
    b = bernoulli(rng, 0.7, (3, 1000))
    result = paired_bootstrap_diff(better_on(b, 100, rng), b, 2000, seed=0)
    low, high = result["ci95"]
    assert result["mean"] == pytest.approx(0.1)
    assert 0 < low < 0.1 < high
    assert high - low < 0.06  # ~ 2 * 1.96 * sqrt(0.1 * 0.9 / 1000) = 0.037


def test_pure_noise_is_not_a_difference() -> None:
    rng = np.random.default_rng(3)
    a, b = bernoulli(rng, 0.8, (3, 1000)), bernoulli(rng, 0.8, (3, 1000))
    low, high = paired_bootstrap_diff(a, b, 2000, seed=0)["ci95"]
    assert low < 0 < high


def test_pairing_narrows_the_interval_of_correlated_variants() -> None:
    rng = np.random.default_rng(4)
    b = bernoulli(rng, 0.7, (1, 1000))
    a = better_on(b, 30, rng)  # right wherever b is, and on 30 more tiles
    low, high = paired_bootstrap_diff(a, b, 2000, seed=0)["ci95"]
    unpaired = [bootstrap_ci(x[0], 2000, seed=0) for x in (a, b)]
    half_widths = sum((hi - lo) / 2 for lo, hi in unpaired)  # ~ 2 * 0.028
    assert (high - low) / 2 < 0.5 * half_widths  # paired: ~ 1.96 * sqrt(0.03 * 0.97 / 1000) = 0.011


def test_seeds_are_resampled_too() -> None:
    # one tile, four seeds: all the spread is between seeds, so an interval that ignored them would be a point
    a = np.array([[0.0], [0.0], [1.0], [1.0]])
    result = paired_bootstrap_diff(a, np.zeros_like(a), 2000, seed=0)
    low, high = result["ci95"]
    assert result["mean"] == 0.5
    assert low <= 0.25 and high >= 0.75


def test_the_bootstrap_is_deterministic_and_chunked(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(5)
    b = bernoulli(rng, 0.7, (3, 1000))
    a = better_on(b, 100, rng)
    first = paired_bootstrap_diff(a, b, 1000, seed=7)
    assert paired_bootstrap_diff(a, b, 1000, seed=7) == first
    assert paired_bootstrap_diff(a, b, 1000, seed=8) != first
    monkeypatch.setattr(metrics, "BOOTSTRAP_CHUNK", 3000)  # 3 resamples per chunk, the last chunk short
    chunked = paired_bootstrap_diff(a, b, 1000, seed=7)
    assert chunked["mean"] == first["mean"]
    assert chunked["ci95"] == pytest.approx(first["ci95"], abs=0.01)  # other draws, the same distribution


def test_the_bootstrap_refuses_unpaired_shapes() -> None:
    with pytest.raises(ValueError, match=r"one shape, got \(2, 10\) and \(2, 9\)"):
        paired_bootstrap_diff(np.zeros((2, 10)), np.zeros((2, 9)), 10, seed=0)
    with pytest.raises(ValueError, match="level"):
        paired_bootstrap_diff(np.zeros((2, 10)), np.zeros((2, 10)), 10, seed=0, level=95)


# ---------------------------------------------------------------- the comparison summary and its views


def constructed() -> dict[str, dict[str, np.ndarray]]:
    """2 K, 3 variants (paired_kd absent at "all"), 2 seeds, 50 tiles; accuracies chosen by hand.

    rgb_only: 30 and 32 of 50 right (0.60, 0.64). full_method: the same tiles plus 5 more per seed
    (0.70, 0.74, Δ 0.10 on every seed). paired_kd: the same tiles as rgb_only (Δ exactly 0).
    At "all": rgb_only 40 and 40 (std 0), full_method 45 and 40 (Δ 0.05).
    """

    def first(*counts: int) -> np.ndarray:
        rows = np.zeros((len(counts), 50))
        for s, n in enumerate(counts):
            rows[s, :n] = 1.0
        return rows

    return {
        "5": {"rgb_only": first(30, 32), "full_method": first(35, 37), "paired_kd": first(30, 32)},
        "all": {"rgb_only": first(40, 40), "full_method": first(45, 40)},
    }


@pytest.fixture(scope="module")
def summary() -> dict:
    return compare_summary(constructed(), "rgb_only", samples=1000, seed=0)


def test_the_summary_has_the_agreed_schema_and_numbers(summary: dict) -> None:
    assert list(summary) == ["baseline", "by_k"] and summary["baseline"] == "rgb_only"
    assert list(summary["by_k"]) == ["5", "all"]
    five, full = summary["by_k"]["5"], summary["by_k"]["all"]
    assert list(five) == ["rgb_only", "full_method", "paired_kd"] and list(full) == ["rgb_only", "full_method"]
    assert set(five["rgb_only"]) == {"mean", "std", "per_seed"}  # the baseline has no diff to itself
    assert five["rgb_only"]["per_seed"] == pytest.approx([0.60, 0.64])
    assert five["rgb_only"]["mean"] == pytest.approx(0.62)
    assert five["rgb_only"]["std"] == pytest.approx(0.04 / math.sqrt(2))  # ddof=1
    assert full["rgb_only"]["std"] == 0.0
    gain = five["full_method"]
    assert set(gain) == {"mean", "std", "per_seed", "diff_vs_rgb_only"}
    assert gain["mean"] == pytest.approx(0.72) and gain["per_seed"] == pytest.approx([0.70, 0.74])
    assert gain["diff_vs_rgb_only"]["mean"] == pytest.approx(0.10)
    low, high = gain["diff_vs_rgb_only"]["ci95"]
    assert 0 < low < 0.10 < high  # 5 of 50 tiles better on each seed, never worse
    assert five["paired_kd"]["diff_vs_rgb_only"] == {"mean": 0.0, "ci95": [0.0, 0.0]}
    assert full["full_method"]["diff_vs_rgb_only"]["mean"] == pytest.approx(0.05)
    # the interval is the paired bootstrap's, with the seed given
    again = paired_bootstrap_diff(constructed()["5"]["full_method"], constructed()["5"]["rgb_only"], 1000, seed=0)
    assert gain["diff_vs_rgb_only"] == again


def test_one_seed_has_zero_std() -> None:
    single = {k: {v: x[:1] for v, x in variants.items()} for k, variants in constructed().items()}
    out = compare_summary(single, "rgb_only", samples=100, seed=0)
    assert out["by_k"]["5"]["full_method"]["std"] == 0.0 and out["by_k"]["5"]["full_method"]["per_seed"] == [0.7]


def test_shapes_must_match_the_baseline() -> None:
    bad = constructed()
    bad["all"]["full_method"] = bad["all"]["full_method"][:, :49]
    with pytest.raises(ValueError, match=r"K='all', variant 'full_method': shape \(2, 49\) differs"):
        compare_summary(bad, "rgb_only", samples=100, seed=0)
    fewer_seeds = constructed()
    fewer_seeds["5"]["paired_kd"] = fewer_seeds["5"]["paired_kd"][:1]
    with pytest.raises(ValueError, match=r"K='5', variant 'paired_kd'"):
        compare_summary(fewer_seeds, "rgb_only", samples=100, seed=0)


def test_the_baseline_must_be_there_at_every_k() -> None:
    missing = constructed()
    del missing["all"]["rgb_only"]
    with pytest.raises(ValueError, match=r"K='all': the baseline 'rgb_only' is missing"):
        compare_summary(missing, "rgb_only", samples=100, seed=0)


def test_the_table_has_one_row_per_k_and_variant(summary: dict) -> None:
    table = compare_table(summary)
    assert list(table.columns) == list(TABLE_COLUMNS)
    assert list(zip(table["k"], table["variant"])) == [
        ("5", "rgb_only"),
        ("5", "full_method"),
        ("5", "paired_kd"),
        ("all", "rgb_only"),
        ("all", "full_method"),
    ]
    assert table["seeds"].tolist() == [2] * 5
    assert table["mean"].tolist() == pytest.approx([0.62, 0.72, 0.62, 0.80, 0.85])
    assert table["diff"].iloc[[1, 2, 4]].tolist() == pytest.approx([0.10, 0.0, 0.05])
    assert table.loc[table["variant"] == "rgb_only", ["diff", "ci_lo", "ci_hi"]].isna().all().all()
    # full_method at "all": better on one seed only, so the seed resampling keeps its interval's low end at 0
    assert table["ci_lo"].iloc[4] == 0.0
    assert table["beats_baseline"].tolist() == [False, True, False, False, False]


def test_the_markdown_lists_every_variant(summary: dict) -> None:
    text = compare_markdown(summary)
    lines = text.strip().splitlines()
    assert lines[0] == "| K | variant | accuracy (mean ± std) | seeds | Δ vs rgb_only [95 % CI] | beats rgb_only |"
    assert len(lines) == 2 + 5  # header, rule, one line per (K, variant)
    for name in ("rgb_only", "full_method", "paired_kd"):
        assert f"| {name} |" in text
    low, high = summary["by_k"]["5"]["full_method"]["diff_vs_rgb_only"]["ci95"]
    assert lines[3] == f"| 5 | full_method | 0.720 ± 0.028 | 2 | +0.100 [{low:+.3f}, {high:+.3f}] | ✓ |"
    assert lines[2] == "| 5 | rgb_only | 0.620 ± 0.028 | 2 | baseline |  |"
    assert text.count("✓") == 1


def test_the_figure_draws_one_line_per_variant(summary: dict) -> None:
    ax = accuracy_by_k_figure(summary).axes[0]
    assert len(ax.containers) == 3  # one errorbar line per variant
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["rgb_only", "full_method", "paired_kd"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["5", "all"]
    assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
    points = {c.get_label(): c.lines[0].get_ydata() for c in ax.containers}
    assert list(points["paired_kd"]) == pytest.approx([0.62])  # absent at "all"
    assert list(points["full_method"]) == pytest.approx([0.72, 0.85])


def test_the_k_axis_puts_named_budgets_last() -> None:
    assert k_axis(["all", "25", "5"]) == ["5", "25", "all"]
    assert k_axis(["5", "all", "1"]) == ["1", "5", "all"]
