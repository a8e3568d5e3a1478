"""Figures of the detector stage and the class colours shared with `ms2rgb detect` overlays.

Built on `matplotlib.figure.Figure` rather than pyplot (as tasks/training/plots.py): no GUI backend and no
global figure state, so stages may run in Prefect worker threads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import cast

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import ListedColormap, to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Patch

# Natural colours for the land-cover surfaces (and scene names people type into `detect`).
NAMED_COLOURS: dict[str, str] = {
    "crop": "#d9c24a",
    "grass": "#8fd14f",
    "herb": "#b5a642",
    "forest": "#1b5e20",
    "soil": "#8d6e63",
    "water": "#1e88e5",
    "asphalt": "#424242",
    "concrete": "#bdbdbd",
    "roof": "#d84315",
    "annualcrop": "#d9c24a",
    "pasture": "#8fd14f",
    "herbaceousvegetation": "#b5a642",
    "highway": "#424242",
    "industrial": "#bdbdbd",
    "residential": "#d84315",
    "river": "#1e88e5",
    "sealake": "#0d47a1",
    "permanentcrop": "#7cb342",
}


def class_colours(names: Sequence[str]) -> np.ndarray:
    """(K, 3) RGB floats in 0..1: a natural colour for known names, tab10/tab20 for free descriptions."""
    # tab20 is a ListedColormap holding RGB tuples; matplotlib's stubs type the registry entry as
    # Colormap and its colors as ArrayLike | ColorType.
    tab20 = cast(ListedColormap, colormaps["tab20"])
    spare = [to_rgb(c) for c in cast("Sequence[tuple[float, float, float]]", tab20.colors)]
    out: list[tuple[float, float, float]] = []
    for i, name in enumerate(names):
        colour: str | tuple[float, float, float] | None = NAMED_COLOURS.get(
            name.lower().replace(" ", "").replace("_", "")
        )
        if colour is None or to_rgb(colour) in out:  # e.g. "water" and "River" both asked for
            # more than 20 free classes repeat colours rather than fail
            colour = next((c for c in spare if c not in out), spare[i % len(spare)])
        out.append(to_rgb(colour))
    return np.array(out)


def legend_handles(names: Sequence[str]) -> list[Patch]:
    """Coloured legend entries matching class_colours."""
    return [Patch(color=c, label=n) for n, c in zip(names, class_colours(names))]


def loss_curves(histories: Mapping[str, Sequence[float]], threshold: float) -> Figure:
    """Training loss per step of every tuned variant, with the stop threshold."""
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    for name, losses in histories.items():
        ax.plot(np.arange(1, len(losses) + 1), losses, label=name, lw=1.2)
    ax.axhline(threshold, color="k", ls="--", lw=1, label=f"loss_threshold {threshold:g}")
    ax.set(xlabel="step", ylabel="focal + dice loss", title="detector prompt tuning")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def miou_vs_shots(full: Mapping[int, float], baselines: Mapping[str, float]) -> Figure:
    """mIoU of the full method against K, baselines (at the largest K) as horizontal lines."""
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ks = sorted(full)
    ax.plot(ks, [full[k] for k in ks], "o-", color="C3", lw=2, label="full method (coupled prompts)")
    for i, (name, value) in enumerate(baselines.items()):
        ax.axhline(value, color=f"C{i}", ls=":", lw=1.2, label=f"{name} {value:.3f}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set(xlabel="K labelled tiles per scene class", ylabel="mIoU (held-out seg_test)", ylim=(0, 1))
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def per_class_bars(per_variant: Mapping[str, Mapping[str, float]], names: Sequence[str]) -> Figure:
    """Grouped bars: IoU of each class for each variant."""
    fig = Figure(figsize=(9, 4))
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(per_variant))
    x = np.arange(len(names))
    for i, (variant, ious) in enumerate(per_variant.items()):
        ax.bar(x + i * width, [ious.get(n, 0.0) for n in names], width, label=variant)
    ax.set_xticks(x + 0.4 - width / 2, names)
    ax.set(ylabel="IoU", ylim=(0, 1), title="per-class IoU on seg_test")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def example_tiles(images: np.ndarray, masks: np.ndarray, preds: np.ndarray, names: Sequence[str]) -> Figure:
    """Rows of RGB | ground truth | prediction, with a colour legend (no-data shown black)."""
    colours = np.vstack([class_colours(names), np.zeros((256 - len(names), 3))])  # index 255 -> black
    fig = Figure(figsize=(7, 2.3 * len(images)))
    axes = fig.subplots(len(images), 3, squeeze=False)
    for row, (img, mask, pred) in enumerate(zip(images, masks, preds)):
        for ax, panel, title in zip(
            axes[row], (img.transpose(1, 2, 0), colours[mask], colours[pred]), ("RGB", "ground truth", "prediction")
        ):
            ax.imshow(panel, interpolation="nearest")
            ax.set_axis_off()
            if row == 0:
                ax.set_title(title)
    fig.legend(handles=legend_handles(names), loc="lower center", ncol=min(5, len(names)), fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig
