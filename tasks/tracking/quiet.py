"""The tracker of a stage's helper processes under torchrun (tasks/training/distributed.py).

Processes 1..N-1 train in step with process 0, which alone logs and registers: they get this
tracker, which takes every call a stage makes and sends nothing anywhere.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ms2rgb.tasks.tracking import StageTracker
from ms2rgb.tasks.tracking.pending import PendingVersions


class QuietTracker(StageTracker):
    """A StageTracker that logs nothing and registers nothing (its model versions are None)."""

    def __init__(self) -> None:  # no MLflow client: this process never talks to the store
        self.run_id = ""
        self.pending = PendingVersions()
        self.inherited = {}

    def log_params(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metric_series(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_artifact(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_figure(self, figure: Any, name: str) -> None:
        import matplotlib.pyplot as plt

        plt.close(figure)  # process 0 logs its own copy; this one only frees it

    def log_table(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_dataset(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_json(self, *args: Any, **kwargs: Any) -> None:
        pass

    @contextmanager
    def child(self, name: str, tags: dict[str, str] | None = None) -> Iterator[StageTracker]:
        yield self

    def log_torch_model(self, *args: Any, **kwargs: Any) -> int | None:
        return None

    def log_pyfunc_model(self, *args: Any, **kwargs: Any) -> int | None:
        return None
