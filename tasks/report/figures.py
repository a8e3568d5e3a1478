"""Figures of the evaluation report, drawn from the `evaluate` stage's dict (reports/evaluate.json)
and, when the compare stage ran, its summary (reports/compare.json).

Built on `matplotlib.figure.Figure` rather than pyplot (as tasks/training/plots.py): no GUI backend
and no global figure state, so the stage may run in a Prefect worker thread. The plots that the
training and detector stages already draw for MLflow are reused from there, so a confusion matrix
or a class colour looks the same in MLflow and in the report.

`write_figures` saves each figure whose inputs the dict holds as a PNG and returns name -> path;
a missing or empty section (e.g. no detector) simply yields no figure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ms2rgb.tasks.data.atomic import write_atomic
from ms2rgb.tasks.data.classes import MASK_NODATA
from ms2rgb.tasks.detection import plots as detection_plots
from ms2rgb.tasks.detection.index_maps import index_maps_figure
from ms2rgb.tasks.report.compare import accuracy_by_k_figure
from ms2rgb.tasks.training import plots as training_plots

# name -> caption, in the order the report shows them; write_figures uses these names.
FIGURE_CAPTIONS: dict[str, str] = {
    "student_confusion": "Student (RGB) confusion matrix on the test tiles: true class on rows, prediction on columns.",
    "teacher_confusion": "Teacher (13-band MS) confusion matrix on the test tiles.",
    "per_class": "Per-class test accuracy: distilled student, RGB-only baseline (mean over seeds) and MS teacher.",
    "reliability": "Student reliability: accuracy against mean confidence per confidence bin (bars), the diagonal "
    "is perfect calibration; the lower panel counts the test tiles in each bin.",
    "miou_vs_k": "Detector mIoU on the held-out segmentation tiles against K labelled tiles per scene class.",
    "detector_overlays": "Detector on a few test tiles: RGB, ground truth, prediction over the RGB and the "
    "pixels it gets wrong (red); no-data is black.",
    # only for tiles rendered from ingested scenes (data.segmentation.source: scenes), which have MS bands
    "index_maps": "Held-out scene tiles: the RGB the detector sees, the spectral indices of the same tile's "
    "MS bands (fixed ranges), the weak labels voted from them, against which the detector is scored (per-class "
    "IoU under method B), and the detector's RGB-only class map; no-data is black.",
    # drawn from reports/compare.json when the compare stage ran; shown in the report's comparison section
    "accuracy_by_k": "Method A: RGB test accuracy (mean ± std over seeds) against the RGB labels per class K, "
    "one line per student variant; the baseline dashed.",
}
DPI = 110

Overlays = tuple[np.ndarray, np.ndarray, np.ndarray, Sequence[str]]  # images, predicted maps, true masks, names


def confusion(section: Mapping[str, Any], title: str) -> Figure | None:
    """The training stages' confusion matrix plot for a {confusion, class_names} section, if it has both."""
    counts, names = section.get("confusion"), section.get("class_names")
    if not counts or not names:
        return None
    fig = training_plots.confusion_matrix(counts, names, title)
    # the report shows two side by side, scaled to about 70 %: larger counts stay readable
    for text in fig.axes[0].texts:
        text.set_fontsize(9)
    return fig


def per_class_comparison(evaluation: Mapping[str, Any]) -> Figure | None:
    """Grouped bars of per-class accuracy: student, RGB-only baseline, teacher (those that are there)."""
    student = evaluation.get("student") or {}
    series = {
        "student (RGB, distilled)": student.get("per_class"),
        "RGB-only (mean over seeds)": (evaluation.get("rgb_only") or {}).get("per_class"),
        "teacher (MS)": (evaluation.get("teacher") or {}).get("per_class"),
    }
    present = {name: values for name, values in series.items() if values}
    if not present:
        return None
    # training_plots.per_class_bars takes its class order from the first series: give it the class table's
    order = list(student.get("class_names") or []) or list(next(iter(present.values())))
    known = {c for values in present.values() for c in values}
    ordered = {
        name: {c: float(values[c]) if values.get(c) is not None else np.nan for c in order if c in known}
        for name, values in present.items()
    }
    fig = training_plots.per_class_bars(ordered, "per-class test accuracy")
    ax = fig.axes[0]  # room above the bars for the legend: accuracies near 1 would sit under it
    ax.set_ylim(0, 1.22)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.legend(loc="upper center", ncol=len(ordered), fontsize=8, frameon=False)
    return fig


def _floats(values: Sequence[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in values], dtype=float)


def reliability_diagram(reliability: Mapping[str, Any], ece: float | None = None) -> Figure:
    """Accuracy per confidence bin (bars) with the gap to the bin's mean confidence, the diagonal, bin counts."""
    edges = np.asarray(reliability["bin_edges"], dtype=float)
    accuracy, confidence = _floats(reliability["accuracy"]), _floats(reliability["confidence"])
    counts = np.asarray(reliability["count"], dtype=int)
    centres, widths = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    filled = counts > 0
    fig = Figure(figsize=(6, 6))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": (3, 1)})
    top.plot([0, 1], [0, 1], ls="--", color="0.4", lw=1, label="perfect calibration")
    top.bar(
        centres[filled],
        accuracy[filled],
        widths[filled] * 0.92,
        color="tab:blue",
        edgecolor="navy",
        label="accuracy",
    )
    top.bar(
        centres[filled],
        (confidence - accuracy)[filled],
        widths[filled] * 0.92,
        bottom=accuracy[filled],
        color="tab:red",
        alpha=0.25,
        hatch="//",
        edgecolor="tab:red",
        label="gap to mean confidence",
    )
    top.plot(centres[filled], confidence[filled], "o", color="tab:red", ms=4, label="mean confidence")
    top.set(ylabel="accuracy", ylim=(0, 1.02), xlim=(float(edges[0]), float(edges[-1])))
    top.set_title("student reliability" + (f" (ECE {ece:.3f})" if ece is not None else ""))
    top.legend(loc="upper left", fontsize=8)
    top.grid(alpha=0.3)
    bottom.bar(centres, counts, widths * 0.92, color="0.55")
    for x, n in zip(centres, counts):
        bottom.text(x, n, str(n), ha="center", va="bottom", fontsize=7)
    bottom.set(xlabel="confidence (max softmax probability)", ylabel="tiles", ylim=(0, max(1, counts.max()) * 1.3))
    bottom.set_xticks(edges, [f"{e:.1f}" for e in edges], fontsize=8)
    fig.tight_layout()
    return fig


def miou_vs_k(miou_by_k: Mapping[str, float], baselines: Mapping[str, float] | None = None) -> Figure:
    """The detector stage's mIoU-against-K plot for {"K": mIoU} (string keys, as JSON has them)."""
    full = {int(k): float(v) for k, v in miou_by_k.items() if v is not None}
    fig = detection_plots.miou_vs_shots(full, dict(baselines or {}))
    fig.axes[0].set_title("detector: mIoU against K")
    return fig


def detector_overlays(
    images: np.ndarray, preds: np.ndarray, masks: np.ndarray, names: Sequence[str], tiles: int | None = None
) -> Figure:
    """Rows of RGB | ground truth | prediction over the RGB | errors: every tile given, or `tiles` evenly spaced.

    `images` (N, 3, H, W) uint8 RGB, `preds` (N, H, W) predicted class ids, `masks` (N, H, W) true
    class ids (255 = no data), `names` the class names (index = id). Colours and legend are the
    detector stage's (`tasks/detection/plots.py`), the 45 % blend the one `ms2rgb detect` draws.
    """
    images, preds, masks = np.asarray(images), np.asarray(preds), np.asarray(masks)
    if not (len(images) == len(preds) == len(masks)) or len(images) == 0:
        raise ValueError(
            f"overlays need as many images, predictions and masks (got {len(images)}, {len(preds)}, "
            f"{len(masks)}), at least one"
        )
    shown = len(images) if tiles is None else max(1, min(tiles, len(images)))
    rows = np.unique(np.linspace(0, len(images) - 1, shown).astype(int))
    colours = np.vstack([detection_plots.class_colours(names), np.zeros((256 - len(names), 3))])  # 255 -> black
    fig = Figure(figsize=(8, 2.1 * len(rows) + 0.7))
    axes = fig.subplots(len(rows), 4, squeeze=False)
    for row, i in enumerate(rows):
        rgb = images[i].transpose(1, 2, 0) / 255.0
        truth, pred = masks[i].astype(int), preds[i].astype(int)
        nodata = truth == MASK_NODATA
        over = np.where(nodata[..., None], rgb, 0.55 * rgb + 0.45 * colours[pred])
        wrong = 0.35 * rgb
        wrong[(pred != truth) & ~nodata] = (0.9, 0.1, 0.1)
        wrong[nodata] = 0.0
        correct = ((pred == truth) & ~nodata).sum() / max(1, (~nodata).sum())
        panels = (
            (rgb, f"tile {i}: RGB"),
            (colours[truth], "ground truth"),
            (over, "prediction"),
            (wrong, f"errors ({1 - correct:.0%} of pixels)"),
        )
        for ax, (panel, title) in zip(axes[row], panels):
            ax.imshow(panel, interpolation="nearest")
            ax.set_title(title, fontsize=8)
            ax.set_axis_off()
    fig.legend(handles=detection_plots.legend_handles(names), loc="lower center", ncol=min(5, len(names)), fontsize=8)
    fig.tight_layout(rect=(0, 0.6 / fig.get_figheight(), 1, 1))
    return fig


def save_png(figure: Figure, path: Path) -> Path:
    """Write `figure` to `path` as a PNG, whole or not at all."""
    return write_atomic(path, lambda tmp: figure.savefig(tmp, format="png", dpi=DPI))


def index_maps(overlays: Overlays | None, indices: np.ndarray | None) -> Figure | None:
    """The overlay tiles' spectral-index maps, when `indices` holds them (None: not scene tiles, none)."""
    if overlays is None or indices is None:
        return None
    images, preds, masks, names = overlays
    return index_maps_figure(images, indices, masks, preds, names)


def build_figures(
    evaluation: Mapping[str, Any],
    overlays: Overlays | None = None,
    compare: Mapping[str, Any] | None = None,
    overlay_indices: np.ndarray | None = None,
) -> dict[str, Figure]:
    """Every figure whose inputs `evaluation` (and the compare summary) hold, by name (FIGURE_CAPTIONS), in order.

    `overlay_indices` (N, 3, H, W): the overlay tiles' NDWI/NDVI/NDBI maps, or None when they have none."""
    student = evaluation.get("student") or {}
    detector = evaluation.get("detector") or {}
    built: dict[str, Figure | None] = {
        "student_confusion": confusion(student, "student (RGB) on the test tiles"),
        "teacher_confusion": confusion(evaluation.get("teacher") or {}, "teacher (MS) on the test tiles"),
        "per_class": per_class_comparison(evaluation),
        "reliability": (
            reliability_diagram(student["reliability"], student.get("ece")) if student.get("reliability") else None
        ),
        "miou_vs_k": miou_vs_k(detector["miou_by_k"]) if detector.get("miou_by_k") else None,
        "detector_overlays": detector_overlays(*overlays) if overlays is not None else None,
        "index_maps": index_maps(overlays, overlay_indices),
        "accuracy_by_k": accuracy_by_k_figure(compare) if compare is not None else None,
    }
    return {name: figure for name, figure in built.items() if figure is not None}


def write_figures(
    evaluation: dict,
    out_dir: Path,
    overlays: tuple | None,
    compare: Mapping[str, Any] | None = None,
    overlay_indices: np.ndarray | None = None,
) -> dict[str, Path]:
    """Save the report's figures as `out_dir/<name>.png`; returns name -> path (only those drawn).

    `overlays` is (images (N,3,H,W) uint8, predicted maps (N,H,W), true masks (N,H,W), class names)
    or None for no overlay figure; `compare` the compare stage's summary (reports/compare.json) or None;
    `overlay_indices` the (N,3,H,W) index maps of the overlay tiles (scene tiles) or None for none.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = build_figures(evaluation, overlays, compare, overlay_indices)
    return {name: save_png(figure, out_dir / f"{name}.png") for name, figure in figures.items()}
