"""Progress and evaluation logging shared by the training stages: console lines, MLflow metrics, figures."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from tasks import plots
from tasks.classes import SCENE_NAMES
from tasks.tracking import StageTracker
from tasks.training import EpochStats, Trainer


def epoch_reporter(tracker: StageTracker, name: str, prefix: str = "") -> Callable[[Trainer, EpochStats], None]:
    """A `fit_classifier` callback: print one progress line and log loss/accuracy at step=epoch."""

    def report(trainer: Trainer, stats: EpochStats) -> None:
        print(trainer.describe(name, stats), flush=True)
        tracker.log_metrics({f"{prefix}train_loss": stats.loss, f"{prefix}train_accuracy": stats.accuracy,
                             f"{prefix}epoch_seconds": stats.seconds}, step=stats.epoch)

    return report


def log_curves(tracker: StageTracker, history: Sequence[EpochStats], title: str, name: str) -> None:
    """Training loss and accuracy against epoch, as one figure."""
    series = {"loss": [h.loss for h in history], "train accuracy": [h.accuracy for h in history]}
    tracker.log_figure(plots.training_curves(series, title), name)


def log_evaluation(tracker: StageTracker, report: dict[str, Any], title: str, folder: str) -> None:
    """Confusion matrix and per-class accuracy of one classifier's `accuracy_report`."""
    tracker.log_figure(plots.confusion_matrix(report["confusion"], SCENE_NAMES, f"{title}: confusion"),
                       f"{folder}/confusion_matrix.png")
    tracker.log_figure(plots.per_class_bars({title: report["per_class"]}, f"{title}: per-class accuracy"),
                       f"{folder}/per_class_accuracy.png")
