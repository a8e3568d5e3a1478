"""The one module that talks to MLflow.

Embedded default: a SQLite tracking store at <root>/mlflow.db and artifacts under
<root>/mlartifacts. MLFLOW_TRACKING_URI overrides both (any server or store MLflow supports).
One parent run per pipeline run; one nested run per stage.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

EXPERIMENT = "ms2rgb"
_MODELS_DIR = Path(__file__).resolve().parents[1] / "models"  # shipped beside logged models


_embedded_uri: str | None = None  # the last embedded store configure() chose


def _user_uri() -> str | None:
    """MLFLOW_TRACKING_URI as the user set it. mlflow.set_tracking_uri copies every URI into that
    variable, so a value equal to our own last embedded choice is ours, not the user's: without
    this, a second project in the same process would log into the first project's store."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    return env if env and env != _embedded_uri else None


def configure(root: Path) -> str:
    """Point MLflow at the store for this project and make sure the experiment exists."""
    global _embedded_uri
    user = _user_uri()
    uri = user or f"sqlite:///{(root / 'mlflow.db').resolve()}"
    if user is None:
        _embedded_uri = uri
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(EXPERIMENT) is None:
        # Only the embedded store gets a local artifact folder; a server chooses its own.
        location = None if user else (root / "mlartifacts").resolve().as_uri()
        mlflow.create_experiment(EXPERIMENT, artifact_location=location)
    mlflow.set_experiment(EXPERIMENT)
    return uri


def _flatten(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:500]
    return flat


@contextmanager
def pipeline_run(root: Path, name: str, tags: dict[str, str] | None = None) -> Iterator[str]:
    """A parent run for one pipeline run; yields its id. Ends FAILED if the body raises."""
    configure(root)
    client = MlflowClient()
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    run = client.create_run(experiment.experiment_id, run_name=name, tags=tags or {})
    status = "FAILED"
    try:
        yield run.info.run_id
        status = "FINISHED"
    finally:
        client.set_terminated(run.info.run_id, status)


class StageTracker:
    """What a stage may log: params, metrics, files, figures, tables and dataset inputs."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id

    def log_params(self, params: dict[str, Any]) -> None:
        mlflow.log_params(_flatten(params))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_metric_series(self, key: str, values: list[float], first_step: int = 1) -> None:
        """One metric at consecutive steps in a single request (per-step calls cost ~20 ms each on SQLite)."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, float(v), now, first_step + i) for i, v in enumerate(values)]
        for start in range(0, len(metrics), 1000):  # MLflow's cap on metrics per batch
            MlflowClient().log_batch(self.run_id, metrics=metrics[start:start + 1000])

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path=folder)
        else:
            mlflow.log_artifact(str(path), artifact_path=folder)

    def log_figure(self, figure: Any, name: str) -> None:
        mlflow.log_figure(figure, name)

    def log_table(self, frame: pd.DataFrame, name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            csv, md = Path(tmp) / f"{name}.csv", Path(tmp) / f"{name}.md"
            frame.to_csv(csv, index=False)
            md.write_text(frame.to_markdown(index=False) if _has_tabulate() else frame.to_string())
            mlflow.log_artifact(str(csv), artifact_path="tables")
            mlflow.log_artifact(str(md), artifact_path="tables")

    def log_dataset(self, frame: pd.DataFrame, name: str, source: Path, context: str) -> None:
        dataset = mlflow.data.from_pandas(frame, source=str(source), name=name)
        mlflow.log_input(dataset, context=context)

    def log_json(self, payload: dict[str, Any], name: str) -> None:
        mlflow.log_text(json.dumps(payload, indent=2, default=str), name)

    @contextmanager
    def child(self, name: str, tags: dict[str, str] | None = None) -> Iterator[StageTracker]:
        """A run nested under this one (a baseline or an ablation); ends FAILED if the body raises."""
        with mlflow.start_run(run_name=name, nested=True, tags=tags or {}) as run:
            yield StageTracker(run.info.run_id)

    def log_torch_model(self, model: Any, input_example: Any, registered_name: str,
                        name: str = "model", serialization_format: str | None = None,
                        extra_requirements: tuple[str, ...] = ()) -> int | None:
        """Log a PyTorch model with signature and input example, register it, return its version.

        The model runs on CPU for the example so the signature holds for any serving host;
        `models/` travels as code so the pickled classes import wherever the model is loaded.
        `serialization_format="pickle"` keeps the Python object (methods and attributes) for
        models that must run more than their traced forward; `extra_requirements` adds pip
        packages the pickled classes import.
        """
        import mlflow.pytorch
        import numpy as np
        import torch
        from mlflow.models import infer_signature

        model = model.to("cpu").eval()
        with torch.no_grad():
            output = model(torch.as_tensor(input_example)).numpy()
        info = mlflow.pytorch.log_model(
            model, name=name, input_example=np.asarray(input_example),
            signature=infer_signature(np.asarray(input_example), output),
            registered_model_name=registered_name, code_paths=[str(_MODELS_DIR)],
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy", *extra_requirements],
            serialization_format=serialization_format,
        )
        return info.registered_model_version

def load_torch_model(root: Path, uri: str) -> Any:
    """Load a logged PyTorch model, e.g. ``models:/ms2rgb-detector/3``, from this project's store."""
    import mlflow.pytorch

    configure(root)
    return mlflow.pytorch.load_model(uri, map_location="cpu")


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


@contextmanager
def stage_run(root: Path, stage: str, parent_run_id: str | None = None,
              tags: dict[str, str] | None = None) -> Iterator[StageTracker]:
    """A run for one stage, nested under `parent_run_id` when the stage is part of a pipeline run."""
    configure(root)
    with mlflow.start_run(run_name=stage, parent_run_id=parent_run_id, nested=parent_run_id is not None,
                          tags={"ms2rgb.stage": stage, **(tags or {})}) as run:
        yield StageTracker(run.info.run_id)
