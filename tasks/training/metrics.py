"""Scores from one confusion matrix: classification accuracy, and segmentation IoU/mIoU/pixel accuracy."""

from __future__ import annotations

from collections.abc import Sequence

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
