"""Segmentation scores from a confusion matrix: per-class IoU, mIoU and pixel accuracy."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ms2rgb.tasks.data.classes import MASK_NODATA


def confusion(pred: np.ndarray, target: np.ndarray, n_classes: int, ignore_index: int = MASK_NODATA) -> np.ndarray:
    """(K, K) pixel counts, rows = ground truth, columns = prediction; ignored pixels count nowhere."""
    valid = target != ignore_index
    codes = target[valid].astype(np.int64) * n_classes + pred[valid].astype(np.int64)
    return np.bincount(codes, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


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
