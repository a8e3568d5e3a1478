"""Progress and evaluation logging shared by the training stages: console lines, MLflow metrics, figures."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ms2rgb.tasks.data.classes import SCENE_NAMES
from ms2rgb.tasks.tracking import StageTracker
from ms2rgb.tasks.training import plots
from ms2rgb.tasks.training.loop import EpochStats, Trainer

PROGRESS_LINES = 20  # per training run: a run of 900 one-batch epochs would otherwise print 900 lines


def epoch_printer(name: str, lines: int = PROGRESS_LINES) -> Callable[[Trainer, EpochStats], None]:
    """A training callback that prints a progress line for the first and last epoch and for about
    `lines` evenly spaced ones between."""

    def report(trainer: Trainer, stats: EpochStats) -> None:
        epoch, every = stats.epoch + 1, max(1, trainer.epochs // lines)
        if epoch == 1 or epoch == trainer.epochs or epoch % every == 0:
            print(trainer.describe(name, stats), flush=True)

    return report


def log_history(tracker: StageTracker, history: Sequence[EpochStats], prefix: str = "") -> None:
    """Loss, training accuracy and seconds per epoch as metric series (step = 1-based epoch).

    Logged once after training, in batches: one SQLite round trip per epoch would cost more
    than a tiny epoch itself.
    """
    for key, values in (
        ("train_loss", [h.loss for h in history]),
        ("train_accuracy", [h.accuracy for h in history]),
        ("epoch_seconds", [h.seconds for h in history]),
    ):
        tracker.log_metric_series(f"{prefix}{key}", values)


def log_curves(tracker: StageTracker, history: Sequence[EpochStats], title: str, name: str) -> None:
    """Training loss and accuracy against epoch, as one figure; also logs them as metric series."""
    log_history(tracker, history)
    series = {"loss": [h.loss for h in history], "train accuracy": [h.accuracy for h in history]}
    tracker.log_figure(plots.training_curves(series, title), name)


def log_evaluation(tracker: StageTracker, report: dict[str, Any], title: str, folder: str) -> None:
    """Confusion matrix and per-class accuracy of one classifier's `accuracy_report`."""
    tracker.log_figure(
        plots.confusion_matrix(report["confusion"], SCENE_NAMES, f"{title}: confusion"),
        f"{folder}/confusion_matrix.png",
    )
    tracker.log_figure(
        plots.per_class_bars({title: report["per_class"]}, f"{title}: per-class accuracy"),
        f"{folder}/per_class_accuracy.png",
    )
