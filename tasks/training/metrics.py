"""Scores: confusion matrix, accuracy, macro-F1, calibration, (paired) bootstrap intervals, segmentation IoU."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

import numpy as np
import torch


def confusion_matrix(
    truth: np.ndarray, pred: np.ndarray, n_classes: int, ignore_index: int | None = None
) -> np.ndarray:
    """(K, K) int64 counts, rows = truth, columns = prediction; `ignore_index` truths count nowhere.

    Works on any matching shapes: (N,) scene labels or (N, H, W) pixel maps.
    """
    truth, pred = np.asarray(truth), np.asarray(pred)
    if ignore_index is not None:
        valid = truth != ignore_index
        truth, pred = truth[valid], pred[valid]
    codes = truth.astype(np.int64).ravel() * n_classes + pred.astype(np.int64).ravel()
    return np.bincount(codes, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def accuracy_report(logits: torch.Tensor, labels: np.ndarray, class_names: list[str]) -> dict:
    """Overall and per-class accuracy, and the confusion matrix (rows: true, columns: predicted)."""
    pred = logits.argmax(1).numpy()
    per_class = {
        name: float((pred[labels == i] == i).mean()) for i, name in enumerate(class_names) if (labels == i).any()
    }
    confusion = confusion_matrix(labels, pred, len(class_names))
    return {"accuracy": float((pred == labels).mean()), "per_class": per_class, "confusion": confusion.tolist()}


def iou_report(conf: np.ndarray, names: Sequence[str]) -> dict:
    """mIoU over classes that occur in the truth or the prediction (mmseg's nan-mean), pixel accuracy.

    A class that is never true and never predicted has no IoU and is left out of the mean
    and of ``per_class_iou``; one predicted but never true scores 0.
    """
    inter = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - inter
    present = union > 0
    iou = np.where(present, inter / np.maximum(union, 1), np.nan)
    total = conf.sum()
    return {
        "miou": float(np.nanmean(iou)) if present.any() else 0.0,
        "pixel_accuracy": float(inter.sum() / total) if total else 0.0,
        "per_class_iou": {name: round(float(v), 4) for name, v in zip(names, iou) if not np.isnan(v)},
    }


def macro_f1(conf: np.ndarray) -> float:
    """Mean F1 over the classes that occur in the truth (a class never true would only add noise)."""
    conf = np.asarray(conf, dtype=np.float64)
    tp, true, predicted = np.diag(conf), conf.sum(1), conf.sum(0)
    present = true > 0
    f1 = 2 * tp / np.maximum(true + predicted, 1)
    return float(f1[present].mean()) if present.any() else 0.0


def calibration(probs: np.ndarray, labels: np.ndarray, bins: int) -> dict:
    """Expected calibration error over `bins` equal-width confidence bins, and the reliability table.

    ECE = sum over bins of (share of tiles in the bin) * |accuracy - mean confidence| (Guo et al. 2017).
    """
    confidence, pred = probs.max(1), probs.argmax(1)
    correct = (pred == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    acc: list[float | None] = []
    conf: list[float | None] = []
    count: list[int] = []
    ece = 0.0
    for b in range(bins):
        rows = which == b
        count.append(int(rows.sum()))
        if not rows.any():
            acc.append(None)
            conf.append(None)
            continue
        acc.append(float(correct[rows].mean()))
        conf.append(float(confidence[rows].mean()))
        ece += rows.mean() * abs(correct[rows].mean() - confidence[rows].mean())
    return {
        "ece": float(ece),
        "reliability": {"bin_edges": edges.tolist(), "accuracy": acc, "confidence": conf, "count": count},
    }


# Resampled index arrays are built this many elements at a time, so memory stays bounded (about
# 8 MB per array) however many tiles and samples are asked for.
BOOTSTRAP_CHUNK = 1 << 20


def percentile_interval(estimates: np.ndarray, level: float) -> tuple[float, float]:
    """The central `level` percentile interval of bootstrap estimates."""
    if not 0 < level < 1:
        raise ValueError(f"level must lie strictly between 0 and 1, got {level}")
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(estimates, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_ci(correct: np.ndarray, samples: int, seed: int, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-item scores (e.g. 1 = tile classified right).

    Resamples items with replacement; seeded, so the same data and seed give the same interval.
    """
    correct = np.asarray(correct, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = correct[rng.integers(0, len(correct), (samples, len(correct)))].mean(1)  # (samples,)
    return percentile_interval(means, level)


def _resample_counts(rng: np.random.Generator, rows: int, size: int) -> np.ndarray:
    """(rows, size) float counts: how often each of `size` items is drawn in `size` draws with replacement."""
    drawn = rng.integers(0, size, (rows, size)) + size * np.arange(rows)[:, None]  # row r's items offset by r*size
    return np.bincount(drawn.ravel(), minlength=rows * size).reshape(rows, size).astype(np.float64)


class PairedDiff(TypedDict):
    """Difference of two variants' mean scores and its bootstrap interval (JSON-ready)."""

    mean: float
    ci95: list[float]  # [low, high]


def paired_bootstrap_diff(a: np.ndarray, b: np.ndarray, samples: int, seed: int, level: float = 0.95) -> PairedDiff:
    """Mean of `a` minus mean of `b` with a paired percentile bootstrap interval.

    `a` and `b` are (S, N) per-tile scores of two variants for S seeds on the same N test tiles,
    seed s of `a` paired with seed s of `b`. Each resample draws seeds and tiles with replacement,
    the same indices for both variants, so what the two share (hard tiles, a lucky seed) cancels
    and only their difference varies; tiles and seeds are the two sources of noise, both resampled.
    Returns {"mean": float, "ci95": [low, high]}; seeded, so the same data and seed give the same result.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape or a.size == 0:
        raise ValueError(f"a and b must be non-empty (seeds, tiles) arrays of one shape, got {a.shape} and {b.shape}")
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    diff = a - b  # (S, N)
    seeds, tiles = diff.shape
    rng = np.random.default_rng(seed)
    means = np.empty(samples)
    chunk = max(1, BOOTSTRAP_CHUNK // tiles)
    for start in range(0, samples, chunk):
        rows = min(chunk, samples - start)
        seed_counts = _resample_counts(rng, rows, seeds)  # (rows, S)
        tile_counts = _resample_counts(rng, rows, tiles)  # (rows, N)
        # the mean over the resampled seed x tile grid, weighting each original cell by its draw counts
        means[start : start + rows] = ((seed_counts @ diff) * tile_counts).sum(1) / (seeds * tiles)
    low, high = percentile_interval(means, level)
    return PairedDiff(mean=float(diff.mean()), ci95=[low, high])


def tile_confusions(truth: np.ndarray, pred: np.ndarray, n_classes: int, ignore_index: int) -> np.ndarray:
    """(N, K, K) int64 confusion matrix of each of N (H, W) tiles; `ignore_index` truths count nowhere."""
    n = truth.shape[0]
    valid = truth != ignore_index  # (N, H, W)
    tile = np.broadcast_to(np.arange(n).reshape(n, *([1] * (truth.ndim - 1))), truth.shape)[valid]
    codes = (tile * n_classes + truth[valid].astype(np.int64)) * n_classes + pred[valid].astype(np.int64)
    return np.bincount(codes, minlength=n * n_classes * n_classes).reshape(n, n_classes, n_classes)


def miou_of_sums(conf: np.ndarray) -> np.ndarray:
    """mIoU of each (R, K, K) confusion matrix, as iou_report computes it (nan-mean over present classes)."""
    inter = np.diagonal(conf, axis1=1, axis2=2)  # (R, K)
    union = conf.sum(1) + conf.sum(2) - inter
    present = union > 0
    iou = np.where(present, inter / np.maximum(union, 1), 0.0)
    return iou.sum(1) / np.maximum(present.sum(1), 1)


def miou_interval(
    tile_confs: Sequence[np.ndarray], samples: int, seed: int, level: float = 0.95
) -> tuple[float, float]:
    """Bootstrap interval of the mean over seeds of mIoU: test tiles resampled (the same draw for every
    seed, since the seeds score the same tiles); tile_confs holds one (N, K, K) array per seed."""
    stacked = np.stack([np.asarray(c, dtype=np.float64) for c in tile_confs])  # (S, N, K, K)
    s, n, k, _ = stacked.shape
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, (samples, n)) + n * np.arange(samples)[:, None]
    weights = np.bincount(draws.ravel(), minlength=samples * n).reshape(samples, n).astype(np.float64)  # (R, N)
    per_seed = [miou_of_sums((weights @ stacked[i].reshape(n, k * k)).reshape(-1, k, k)) for i in range(s)]
    return percentile_interval(np.mean(per_seed, axis=0), level)
