"""Figures logged to MLflow for method A. Each function returns a matplotlib Figure.

Figures are built with `matplotlib.figure.Figure` directly rather than pyplot, so no GUI
backend and no global figure state are involved (stages may run in Prefect worker threads).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure


def training_curves(history: Mapping[str, Sequence[float]], title: str) -> Figure:
    """One line per series (e.g. loss, train accuracy) against epoch."""
    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    for name, values in history.items():
        ax.plot(np.arange(1, len(values) + 1), values, marker="o", markersize=3, label=name)
    ax.set_xlabel("epoch")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def confusion_matrix(confusion: Sequence[Sequence[int]], class_names: Sequence[str], title: str) -> Figure:
    """Counts with true classes on rows and predictions on columns."""
    counts = np.asarray(confusion)
    fig = Figure(figsize=(7, 6))
    ax = fig.add_subplot()
    image = ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(class_names)), class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), n in np.ndenumerate(counts):
        if n:
            ax.text(
                j, i, str(n), ha="center", va="center", fontsize=7, color="white" if n > counts.max() / 2 else "black"
            )
    fig.colorbar(image, ax=ax)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def per_class_bars(per_class: Mapping[str, Mapping[str, float]], title: str) -> Figure:
    """Grouped bars: accuracy per class (x) for each named model (one colour each)."""
    models = list(per_class)
    classes = list(next(iter(per_class.values())))
    width = 0.8 / len(models)
    fig = Figure(figsize=(max(6.0, 0.9 * len(classes)), 3.8))
    ax = fig.add_subplot()
    for k, model in enumerate(models):
        ax.bar(
            np.arange(len(classes)) + k * width, [per_class[model].get(c, np.nan) for c in classes], width, label=model
        )
    ax.set_xticks(np.arange(len(classes)) + 0.4 - width / 2, classes, rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=min(3, len(models)))
    fig.tight_layout()
    return fig


def comparison_bars(means: Mapping[str, float], stds: Mapping[str, float], title: str) -> Figure:
    """One bar per method with its std over seeds as an error bar."""
    names = list(means)
    fig = Figure(figsize=(7, 3.5))
    ax = fig.add_subplot()
    ax.bar(names, [means[n] for n in names], yerr=[stds[n] for n in names], capsize=4, color="tab:blue")
    for i, name in enumerate(names):
        ax.text(i, means[name] + stds[name] + 0.01, f"{means[name]:.3f}", ha="center", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("RGB test accuracy")
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def rematch_rounds(epochs: Sequence[int], changed: Sequence[float], same_class: Sequence[float]) -> Figure:
    """Share of pairs that changed and same-class rate after each re-matching round."""
    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    ax.plot(epochs, changed, marker="o", label="pairs changed")
    ax.plot(epochs, same_class, marker="s", label="same-class rate")
    ax.set_xlabel("epoch of re-matching")
    ax.set_ylim(0, 1.05)
    ax.set_title("re-matching rounds")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig
