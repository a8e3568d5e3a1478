"""Method A comparison: student variants against a baseline under several RGB label budgets K.

Pure (numpy, pandas, matplotlib; no tracking, no orchestration): the `compare` stage hands in
per-tile correctness and writes `compare_summary`'s dict to reports/compare.json; the table,
markdown and figure are all drawn from that dict, so the HTML report can redraw them from the JSON.

Input of `compare_summary`: K name ("5", "25", "all") -> variant name -> (S, N) array of per-tile
correctness (1.0 right, 0.0 wrong) for S seeds on the same N RGB test tiles, seed s of every
variant trained with the same seed, so variants are compared pairwise (`paired_bootstrap_diff`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ms2rgb.tasks.training.metrics import paired_bootstrap_diff

TABLE_COLUMNS = ("k", "variant", "mean", "std", "seeds", "diff", "ci_lo", "ci_hi", "beats_baseline")


def _accuracy(per_seed: np.ndarray) -> dict[str, Any]:
    """Mean, sample std (0.0 for one seed: no spread can be measured) and the per-seed accuracies."""
    std = float(per_seed.std(ddof=1)) if len(per_seed) > 1 else 0.0
    return {"mean": float(per_seed.mean()), "std": std, "per_seed": [float(a) for a in per_seed]}


def _k_summary(
    k: str, variants: Mapping[str, np.ndarray], baseline: str, samples: int, seed: int
) -> dict[str, dict[str, Any]]:
    """Every variant under one K: its accuracy and, except the baseline, its paired difference to it."""
    if baseline not in variants:
        raise ValueError(f"K={k!r}: the baseline {baseline!r} is missing (variants there: {sorted(variants)})")
    base = np.asarray(variants[baseline], dtype=np.float64)
    if base.ndim != 2 or base.size == 0:
        raise ValueError(f"K={k!r}, variant {baseline!r}: expected a non-empty (seeds, tiles) array, got {base.shape}")
    out: dict[str, dict[str, Any]] = {}
    for name, values in variants.items():
        scores = np.asarray(values, dtype=np.float64)
        if scores.shape != base.shape:
            raise ValueError(
                f"K={k!r}, variant {name!r}: shape {scores.shape} differs from the baseline {baseline!r}'s "
                f"{base.shape}; every variant needs the same seeds and test tiles"
            )
        out[name] = _accuracy(scores.mean(1))  # (S,) accuracy per seed
        if name != baseline:
            out[name][f"diff_vs_{baseline}"] = dict(paired_bootstrap_diff(scores, base, samples, seed))
    return out


def compare_summary(
    correct: dict[str, dict[str, np.ndarray]], baseline: str, samples: int, seed: int
) -> dict[str, Any]:
    """{"baseline": name, "by_k": {K: {variant: {mean, std, per_seed[, diff_vs_<baseline>]}}}}, K in given order.

    Raises ValueError naming K and the variant when a shape differs from the baseline's, or when
    the baseline is missing under some K. Every comparison uses the same bootstrap seed, so the
    variants under one K are judged on the same resamples.
    """
    by_k = {str(k): _k_summary(str(k), variants, baseline, samples, seed) for k, variants in correct.items()}
    return {"baseline": baseline, "by_k": by_k}


def compare_table(summary: Mapping[str, Any]) -> pd.DataFrame:
    """One row per (K, variant); the baseline's own diff columns are NaN and it never beats itself."""
    key = f"diff_vs_{summary['baseline']}"
    rows = []
    for k, variants in summary["by_k"].items():
        for name, s in variants.items():
            diff = s.get(key)
            low, high = diff["ci95"] if diff else (np.nan, np.nan)
            rows.append(
                {
                    "k": k,
                    "variant": name,
                    "mean": s["mean"],
                    "std": s["std"],
                    "seeds": len(s["per_seed"]),
                    "diff": diff["mean"] if diff else np.nan,
                    "ci_lo": low,
                    "ci_hi": high,
                    "beats_baseline": bool(diff) and low > 0,
                }
            )
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


def compare_cells(summary: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Headers and text cells of the comparison table, shared by the markdown and the HTML report."""
    baseline = summary["baseline"]
    headers = ["K", "variant", "accuracy (mean ± std)", "seeds", f"Δ vs {baseline} [95 % CI]", f"beats {baseline}"]
    rows = []
    for r in compare_table(summary).itertuples(index=False):
        delta = "baseline" if r.variant == baseline else f"{r.diff:+.3f} [{r.ci_lo:+.3f}, {r.ci_hi:+.3f}]"
        rows.append(
            [
                str(r.k),
                str(r.variant),
                f"{r.mean:.3f} ± {r.std:.3f}",
                str(r.seeds),
                delta,
                "✓" if r.beats_baseline else "",
            ]
        )
    return headers, rows


def compare_markdown(summary: Mapping[str, Any]) -> str:
    """The comparison as a markdown table; ✓ marks an interval wholly above 0."""
    headers, rows = compare_cells(summary)

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(headers), line(["---"] * len(headers)), *map(line, rows)]) + "\n"


def k_axis(ks: list[str]) -> list[str]:
    """Numeric budgets ascending, then named ones ("all") in their given order: a budget axis grows left to right."""
    return sorted(ks, key=lambda k: (0, int(k)) if k.isdigit() else (1, 0))


def accuracy_by_k_figure(summary: Mapping[str, Any]) -> Figure:
    """Accuracy (mean, std over seeds as error bar) against K, one line per variant; the baseline dashed."""
    by_k = summary["by_k"]
    ks = k_axis(list(by_k))
    variants = list(dict.fromkeys(name for k in ks for name in by_k[k]))  # first-seen order
    fig = Figure(figsize=(7.5, 4.2))
    ax = fig.add_subplot()
    # a small sideways shift per variant keeps error bars at the same K from hiding one another
    shifts = np.linspace(-0.15, 0.15, len(variants)) if len(variants) > 1 else np.zeros(1)
    for variant, shift in zip(variants, shifts):
        at = [i for i, k in enumerate(ks) if variant in by_k[k]]  # K "all" may lack some variants
        ax.errorbar(
            np.asarray(at) + shift,
            [by_k[ks[i]][variant]["mean"] for i in at],
            yerr=[by_k[ks[i]][variant]["std"] for i in at],
            marker="o",
            markersize=4,
            capsize=3,
            linestyle="--" if variant == summary["baseline"] else "-",
            label=variant,
        )
    ax.set_xticks(range(len(ks)), ks)
    ax.set_xlabel("RGB labels per class (K)")
    ax.set_ylabel("RGB test accuracy")
    ax.set_title("method A: accuracy against label budget (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig
