"""Score each kind of model on its held-out test set, the same way for a challenger and a champion.

One function per model kind; each returns the figures `evaluate` reports and promotion compares,
and the per-tile outcomes behind the headline metric, which promotion compares tile by tile
(`tasks/evaluation/evidence.py`). HEADLINE names, per model kind (the stage that trains it), the
metric that must improve and the metrics that must not regress (a leading "-" marks one where lower
is better).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ms2rgb.models.matcher import CrossModalMatcher, PairScorer
from ms2rgb.tasks.config import EvaluateConfig
from ms2rgb.tasks.data.cache import CachedSplit
from ms2rgb.tasks.data.classes import MASK_NODATA, SCENE_NAMES
from ms2rgb.tasks.data.pairing import PairSet
from ms2rgb.tasks.training.inference import embed, predict_logits
from ms2rgb.tasks.training.metrics import accuracy_report, bootstrap_ci, calibration, macro_f1, tile_confusions

if TYPE_CHECKING:
    from ms2rgb.models.clip_detector import ClassMapDetector  # imports open_clip: only the detector needs it

# model kind -> (headline metric, other tracked metrics; "-" = lower is better)
HEADLINE: dict[str, tuple[str, tuple[str, ...]]] = {
    "teacher": ("accuracy", ("macro_f1",)),
    "matcher": ("pair_top1", ("pair_top5",)),
    "student": ("accuracy", ("macro_f1", "-ece")),
    "detector": ("miou", ("pixel_accuracy",)),
}


@dataclass
class TestData:
    """Every held-out set the evaluate stage scores on, loaded once."""

    ms_test: CachedSplit  # test, MS: the teacher
    rgb_test: CachedSplit  # test, RGB: the student
    pairs: PairSet  # pair_test: the matcher
    seg_images: torch.Tensor  # seg_test (N, 3, H, W) uint8: the detector
    seg_masks: torch.Tensor  # seg_test (N, H, W) uint8 surface ids


@dataclass
class Scored:
    """One model's figures on its held-out set, and what promotion compares tile by tile."""

    figures: dict[str, Any]  # what reports/evaluate.json shows
    outcomes: np.ndarray  # per test tile: (N,) headline score (1 = right), or (N, K, K) confusions
    maps: np.ndarray | None = None  # the detector's predicted class maps (N, H, W); None for others


def score_classifier(model: nn.Module, split: CachedSplit, cfg: EvaluateConfig, seed: int) -> Scored:
    """Accuracy with a bootstrap interval, macro-F1, calibration, per-class accuracy, confusion;
    outcomes: 1.0 where a tile is classified right."""
    logits = predict_logits(model, split.images)
    probs = logits.softmax(1).numpy()
    report = accuracy_report(logits, split.labels, SCENE_NAMES)
    correct = probs.argmax(1) == split.labels
    calib = calibration(probs, split.labels, cfg.ece_bins)
    figures = {
        "accuracy": report["accuracy"],
        "accuracy_ci95": list(bootstrap_ci(correct, cfg.bootstrap, seed)),
        "macro_f1": macro_f1(np.asarray(report["confusion"])),
        "ece": calib["ece"],
        "reliability": calib["reliability"],
        "per_class": report["per_class"],
        "confusion": report["confusion"],
        "class_names": list(SCENE_NAMES),
        "test_tiles": len(split.labels),
    }
    return Scored(figures, correct.astype(np.float64))


def score_matcher(model: nn.Module, pairs: PairSet) -> Scored:
    """Retrieval of each RGB tile's true MS partner among the held-out pairs (as
    `training.inference.retrieval` ranks it); outcomes: 1.0 where the partner is ranked first."""
    matcher = model.matcher if isinstance(model, PairScorer) else model  # the registry holds the scorer
    if not isinstance(matcher, CrossModalMatcher):
        raise TypeError(f"expected a matcher, got {type(model).__name__}")
    matcher.eval()
    scores = matcher.score(embed(matcher, pairs.rgb, "rgb"), embed(matcher, pairs.ms, "ms"))  # (N, N)
    rank = (scores > scores.diagonal().unsqueeze(1)).sum(1).numpy()  # (N,) 0 = partner scored best
    top1, top5 = (rank < 1).astype(np.float64), (rank < 5).astype(np.float64)
    figures = {"pair_top1": float(top1.mean()), "pair_top5": float(top5.mean()), "test_pairs": len(pairs.labels)}
    return Scored(figures, top1)


def score_detector(model: ClassMapDetector, data: TestData, cfg: EvaluateConfig) -> Scored:
    """mIoU, pixel accuracy and per-class IoU on seg_test; outcomes: each tile's confusion matrix
    (their sum gives the mIoU); also the predicted class maps."""
    from ms2rgb.tasks.detection.tune import evaluate  # the detector's own scoring, one definition
    from ms2rgb.tasks.training.loop import pick_device

    scores, preds = evaluate(model, data.seg_images, data.seg_masks, pick_device(), cfg.batch_size)
    keep = ("miou", "pixel_accuracy", "per_class_iou")
    figures = {k: scores[k] for k in keep} | {"test_tiles": len(data.seg_images)}
    n_classes = len(model.class_names)
    return Scored(figures, tile_confusions(data.seg_masks.numpy(), preds, n_classes, MASK_NODATA), preds)


def headline(kind: str, metrics: dict[str, Any]) -> dict[str, float]:
    """The figures promotion compares for one kind of model."""
    head, others = HEADLINE[kind]
    return {m.lstrip("-"): float(metrics[m.lstrip("-")]) for m in (head, *others)}
