"""The one module that talks to MLflow.

Embedded default: a SQLite tracking store at <root>/mlflow.db and artifacts under
<root>/mlartifacts. MLFLOW_TRACKING_URI overrides both (any server or store MLflow supports).
One parent run per pipeline run; one nested run per stage. Nothing here names the experiment or a
registered model: callers pass the names params.yaml gives (`tracking.experiment`,
`config.model_name(params.tracking.model_prefix, kind)`), so projects sharing a server stay apart.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

from ms2rgb.tasks.errors import Ms2rgbError
from ms2rgb.tasks.tracking.pending import CHALLENGER as CHALLENGER  # re-exported: callers name both aliases here
from ms2rgb.tasks.tracking.pending import PendingVersions

if TYPE_CHECKING:
    import numpy as np
    import torch

    from ms2rgb.tasks.tracking.pyfunc import TorchPyfunc

TIMEOUT_ENV = "MS2RGB_TRACKING_TIMEOUT"  # seconds to wait for a tracking server before giving up
# Tags that let a later process tell a run left RUNNING by a killed process from a live one.
PID_TAG, HOST_TAG = "ms2rgb.pid", "ms2rgb.host"
# The Prefect flow run a run was made in (set on the pipeline's parent run, inherited by its stage runs and
# their children): what a retrain tags its own runs by, never by time, so other flows' runs stay untouched.
FLOW_RUN_TAG = "ms2rgb.flow_run_id"
# Registry aliases: every newly registered version becomes the challenger once its stage succeeded
# (tracking/pending.py); whoever promotes a version (the evaluate stage, a person) moves `champion`,
# which serving reads (models:/NAME@champion).
CHAMPION = "champion"


class TrackingUnreachable(Ms2rgbError):
    """MLFLOW_TRACKING_URI names a server that does not answer."""


_MODELS_DIR = Path(__file__).resolve().parents[2] / "models"  # shipped beside logged models


_embedded_uri: str | None = None  # the last embedded store connect() chose


def _user_uri() -> str | None:
    """MLFLOW_TRACKING_URI as the user set it. mlflow.set_tracking_uri copies every URI into that
    variable, so a value equal to our own last embedded choice is ours, not the user's: without
    this, a second project in the same process would log into the first project's store."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    return env if env and env != _embedded_uri else None


def check_reachable(uri: str) -> None:
    """Fail within MS2RGB_TRACKING_TIMEOUT seconds (default 20) when an HTTP tracking server is down.

    MLflow's own client retries with back-off for minutes; a user waiting on a dead server
    deserves an answer, and the MLflow client gets the same bounded budget afterwards.
    """
    if not uri.startswith(("http://", "https://")):
        return
    budget = float(os.environ.get(TIMEOUT_ENV, "20"))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, int(budget))))
    deadline, error = time.monotonic() + budget, ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=min(5.0, budget)):
                return
        except (urllib.error.URLError, OSError) as err:
            error = str(getattr(err, "reason", err))
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    raise TrackingUnreachable(
        f"MLFLOW_TRACKING_URI={uri}: no MLflow server answered within {budget:g} s ({error}). Fix: start one "
        "(`mlflow server --host 127.0.0.1 --port 5000`), or unset MLFLOW_TRACKING_URI to use the project's "
        f"SQLite store; {TIMEOUT_ENV} sets the wait"
    )


def connect(root: Path) -> str:
    """Point MLflow at the store for this project (the registry needs no experiment); its URI."""
    global _embedded_uri
    user = _user_uri()
    uri = user or f"sqlite:///{(root / 'mlflow.db').resolve()}"
    if user is None:
        _embedded_uri = uri
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    return uri


def configure(root: Path, experiment: str) -> str:
    """connect(), then make `experiment` (params tracking.experiment) exist and be the active one."""
    uri = connect(root)
    if mlflow.get_experiment_by_name(experiment) is None:
        # Only the embedded store gets a local artifact folder; a server chooses its own.
        location = None if _user_uri() else (root / "mlartifacts").resolve().as_uri()
        mlflow.create_experiment(experiment, artifact_location=location)
    mlflow.set_experiment(experiment)
    _mark_orphans_killed(experiment)
    return uri


def _owner_tags() -> dict[str, str]:
    return {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _mark_orphans_killed(experiment: str) -> None:
    """Runs of this host left RUNNING by a process that no longer exists (kill -9) become KILLED."""
    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return
    host = socket.gethostname()
    query = f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'"
    for run in client.search_runs([found.experiment_id], filter_string=query, max_results=500):
        pid = run.data.tags.get(PID_TAG, "")
        if pid.isdigit() and not _alive(int(pid)):
            client.set_terminated(run.info.run_id, "KILLED")


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
def pipeline_run(root: Path, experiment: str, name: str, tags: dict[str, str] | None = None) -> Iterator[str]:
    """A parent run for one pipeline run in `experiment`; yields its id. Ends FAILED if the body raises.

    Its FLOW_RUN_TAG (in `tags`) is inherited by the stage runs nested under it (stage_run)."""
    configure(root, experiment)
    client = MlflowClient()
    found = mlflow.get_experiment_by_name(experiment)
    assert found is not None, "configure() creates the experiment"
    run = client.create_run(found.experiment_id, run_name=name, tags={**_owner_tags(), **(tags or {})})
    status = "FAILED"
    try:
        yield run.info.run_id
        status = "FINISHED"
    finally:
        client.set_terminated(run.info.run_id, status)


class StageTracker:
    """What a stage may log: params, metrics, files, figures, tables and dataset inputs.

    Every method logs to this tracker's own run (by id, through MlflowClient), never to
    whichever run happens to be active: a stage tracker used inside one of its child runs
    still logs to the stage's run. Models it registers, its children's included, are collected
    in `pending`: `stage_run` sets their `challenger` alias when the stage succeeded, or deletes
    them when it failed.
    """

    def __init__(
        self, run_id: str, pending: PendingVersions | None = None, inherited: dict[str, str] | None = None
    ) -> None:
        self.run_id = run_id
        self._client = MlflowClient()
        self.pending = PendingVersions() if pending is None else pending
        self.inherited = dict(inherited or {})  # tags every child run carries too (FLOW_RUN_TAG)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in _flatten(params).items()]
        for start in range(0, len(items), 100):  # MLflow's cap on params per batch
            self._client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step or 0) for k, v in metrics.items()])

    def log_metric_series(self, key: str, values: list[float], first_step: int = 1) -> None:
        """One metric at consecutive steps in a single request (per-step calls cost ~20 ms each on SQLite)."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, float(v), now, first_step + i) for i, v in enumerate(values)]
        for start in range(0, len(metrics), 1000):  # MLflow's cap on metrics per batch
            self._client.log_batch(self.run_id, metrics=metrics[start : start + 1000])

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path=folder)
        else:
            self._client.log_artifact(self.run_id, str(path), artifact_path=folder)

    def log_figure(self, figure: Any, name: str) -> None:
        self._client.log_figure(self.run_id, figure, name)

    def log_table(self, frame: pd.DataFrame, name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            csv, md = Path(tmp) / f"{name}.csv", Path(tmp) / f"{name}.md"
            frame.to_csv(csv, index=False)
            md.write_text(frame.to_markdown(index=False) if _has_tabulate() else frame.to_string())
            self._client.log_artifact(self.run_id, str(csv), artifact_path="tables")
            self._client.log_artifact(self.run_id, str(md), artifact_path="tables")

    def log_dataset(self, frame: pd.DataFrame, name: str, source: Path, context: str) -> None:
        from mlflow.data.pandas_dataset import from_pandas  # what mlflow.data.from_pandas is, typed
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        dataset = from_pandas(frame, source=str(source), name=name)
        entry = DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
        self._client.log_inputs(self.run_id, datasets=[entry])

    def log_json(self, payload: dict[str, Any], name: str) -> None:
        self._client.log_text(self.run_id, json.dumps(payload, indent=2, default=str), name)

    @contextmanager
    def _active(self) -> Iterator[None]:
        """Make this run MLflow's active one for calls that log only into the active run (log_model).

        The run stays RUNNING afterwards: whoever opened it ends it.
        """
        active = mlflow.active_run()
        if active is not None and active.info.run_id == self.run_id:
            yield
            return
        mlflow.start_run(run_id=self.run_id, nested=active is not None)
        try:
            yield
        finally:
            mlflow.end_run(status="RUNNING")

    @contextmanager
    def child(self, name: str, tags: dict[str, str] | None = None) -> Iterator[StageTracker]:
        """A run nested under this one (a baseline or an ablation); ends FAILED if the body raises."""
        with mlflow.start_run(
            run_name=name,
            parent_run_id=self.run_id,
            nested=True,
            tags={**self.inherited, **_owner_tags(), **(tags or {})},
        ) as run:
            # the stage's registrations stay one transaction; the flow run's tag goes down the tree
            yield StageTracker(run.info.run_id, self.pending, self.inherited)

    def log_torch_model(
        self,
        model: Any,
        input_example: Any,
        registered_name: str,
        name: str = "model",
        serialization_format: str | None = None,
        extra_requirements: tuple[str, ...] = (),
    ) -> int | None:
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
        self.pending.note_model(self._client, registered_name)
        with self._active():
            info = mlflow.pytorch.log_model(
                model,
                name=name,
                input_example=np.asarray(input_example),
                signature=infer_signature(np.asarray(input_example), output),
                registered_model_name=registered_name,
                code_paths=[str(_MODELS_DIR)],
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy", *extra_requirements],
                serialization_format=serialization_format,
            )
        return self._registered(registered_name, info.registered_model_version)

    def log_pyfunc_model(
        self,
        python_model: TorchPyfunc,
        artifacts: dict[str, Path],
        input_example: np.ndarray,
        registered_name: str,
        name: str = "model",
        any_size: bool = False,
        metadata: dict[str, Any] | None = None,
        extra_requirements: tuple[str, ...] = (),
    ) -> int | None:
        """Log a pyfunc model whose weights are `artifacts` (files), register it, return its version.

        `python_model` (a class of tasks/tracking/pyfunc.py) rebuilds its torch module from the files
        on load; the model's code is tasks/tracking/model_code.py, which names the class, so nothing
        is pickled. It is loaded here once to compute the example's output, so the signature is what
        serving answers. The input is float32 (N, C, H, W) with the example's C, H, W, or any H, W when
        `any_size` (the output's last two axes follow them). `metadata` lands in the MLmodel file
        (e.g. class_names, to name the output's indices).
        """
        import mlflow.pyfunc
        import numpy as np
        import torch
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        from ms2rgb.tasks.tracking.pyfunc import MODEL_CODE, PYFUNCS

        if type(python_model).__name__ not in PYFUNCS:
            raise ValueError(
                f"{type(python_model).__name__} is not one of {sorted(PYFUNCS)} (tasks/tracking/pyfunc.py)"
            )
        example = np.ascontiguousarray(input_example, dtype=np.float32)
        output = python_model.loaded(artifacts).predict(None, example)
        in_shape: tuple[int, ...] = (-1, *example.shape[1:])
        out_shape: tuple[int, ...] = (-1, *output.shape[1:])
        if any_size:
            in_shape = (*in_shape[:2], -1, -1)
            out_shape = (*out_shape[:-2], -1, -1) if output.ndim >= 3 else out_shape
        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.float32), in_shape)]),
            outputs=Schema([TensorSpec(output.dtype, out_shape)]),
        )
        self.pending.note_model(self._client, registered_name)
        with self._active():
            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=str(MODEL_CODE),  # models from code: the class is named, not pickled
                model_config={"pyfunc": type(python_model).__name__},
                artifacts={key: str(path) for key, path in artifacts.items()},
                signature=signature,
                input_example=example,
                registered_model_name=registered_name,
                metadata=metadata,
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy", *extra_requirements],
            )
        return self._registered(registered_name, info.registered_model_version)

    def _registered(self, registered_name: str, version: int | None) -> int | None:
        """A newly registered version waits in `pending`: it becomes the `challenger` only when its stage
        succeeded, after the stage's outputs were swapped in (stage_run)."""
        if version is not None:
            self.pending.add(registered_name, int(version))
        return version


def _has_store(root: Path) -> bool:
    """Whether there is a store to read: a user's URI, or the project's embedded SQLite file."""
    return _user_uri() is not None or (root / "mlflow.db").exists()


def _open_store(root: Path, what: str) -> None:
    """connect() for a command that reads or edits the registry: never creates an embedded store."""
    if not _has_store(root):
        raise Ms2rgbError(
            f"{root / 'mlflow.db'}: no MLflow store in this project, so {what}. "
            "Fix: run the pipeline first (`make run`), or set MLFLOW_TRACKING_URI to the store "
            "that holds the model"
        )
    connect(root)


def load_torch_model(root: Path, uri: str) -> Any:
    """Load a registered model's torch module, e.g. ``models:/ms2rgb-detector/3``, from this project's store.

    Same as load_registered_module (registered models are torch- or pyfunc-flavoured).
    """
    return load_registered_module(root, uri)


def load_registered_module(root: Path, uri: str) -> torch.nn.Module:
    """The torch module behind a registered model, ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``.

    Torch-flavoured versions load with mlflow.pytorch; pyfunc versions (tasks/tracking/pyfunc.py)
    rebuild their module from the logged weight files. On CPU, in eval mode. Raises Ms2rgbError
    when the project has no store (none is created), the URI resolves to nothing, or the model
    holds no torch module. Torch versions logged in the default pt2 format come back as the
    exported program's module (its traced forward only).
    """
    import mlflow.models
    import mlflow.pyfunc
    import mlflow.pytorch
    import torch
    from mlflow.exceptions import MlflowException

    from ms2rgb.tasks.tracking.pyfunc import TorchPyfunc

    _open_store(root, f"{uri} cannot be loaded")
    try:
        if "pytorch" in mlflow.models.get_model_info(uri).flavors:
            module = mlflow.pytorch.load_model(uri, map_location="cpu")
        else:
            # suppress_warnings skips MLflow's check of the model's pip requirements against every
            # installed distribution: 2.4 s of a 20 s `detect` on a scene, only to warn, and the model
            # runs in the venv of the project that logged it.
            python_model = mlflow.pyfunc.load_model(uri, suppress_warnings=True).unwrap_python_model()
            if not isinstance(python_model, TorchPyfunc):
                raise Ms2rgbError(
                    f"{uri} is a {type(python_model).__name__} pyfunc model, not one of ms2rgb's torch models"
                )
            module = python_model.module
    except MlflowException as err:
        raise Ms2rgbError(f"{uri} could not be loaded: {err.message}") from err
    if not isinstance(module, torch.nn.Module):
        raise Ms2rgbError(f"{uri} holds a {type(module).__name__}, not a torch module")
    with suppress(NotImplementedError):  # a pt2-exported program's module was exported in eval mode, refuses eval()
        module.eval()
    return module


def set_alias(root: Path, name: str, alias: str, version: int) -> None:
    """Point `alias` of registered model `name` at `version` (moving it from any other version)."""
    from mlflow.exceptions import MlflowException

    _open_store(root, f"alias {alias!r} of {name} cannot be set")
    try:
        MlflowClient().set_registered_model_alias(name, alias, str(version))
    except MlflowException as err:
        raise Ms2rgbError(f"{name} version {version}: alias {alias!r} could not be set: {err.message}") from err


def version_by_alias(root: Path, name: str, alias: str) -> int | None:
    """The version of `name` that `alias` points at; None when the alias, the model or the store does not exist."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST, ErrorCode

    if not _has_store(root):  # reading must not create a store
        return None
    connect(root)
    try:
        return int(MlflowClient().get_model_version_by_alias(name, alias).version)
    except MlflowException as err:
        # An unknown model is RESOURCE_DOES_NOT_EXIST; an unknown alias of a known model, a "not found"
        # INVALID_PARAMETER_VALUE.
        if err.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST) or (
            err.error_code == ErrorCode.Name(INVALID_PARAMETER_VALUE) and "not found" in err.message
        ):
            return None
        raise


def version_exists(root: Path, name: str, version: int) -> bool:
    """Whether registered model `name` holds `version` (False without a store; none is created)."""
    if not _has_store(root):
        return False
    connect(root)
    return any(int(v.version) == version for v in MlflowClient().search_model_versions(f"name='{name}'"))


def tag_version(root: Path, name: str, version: int, tags: dict[str, str]) -> None:
    """Set tags on one registered model version (e.g. the evaluation that promoted or rejected it)."""
    from mlflow.exceptions import MlflowException

    _open_store(root, f"{name} version {version} cannot be tagged")
    client = MlflowClient()
    try:
        for key, value in tags.items():
            client.set_model_version_tag(name, str(version), key, str(value))
    except MlflowException as err:
        raise Ms2rgbError(f"{name} version {version} could not be tagged: {err.message}") from err


def tag_flow_run(root: Path, experiment: str, flow_run_id: str, tags: dict[str, str]) -> int:
    """Put `tags` on every run of `experiment` made in the Prefect flow run `flow_run_id` (its FLOW_RUN_TAG);
    how many. A retrain marks its own runs with its data version so; runs of any other flow run, project or
    person on the same server are left alone, whenever they started."""
    configure(root, experiment)
    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return 0
    query = f"tags.`{FLOW_RUN_TAG}` = '{flow_run_id}'"
    runs = client.search_runs([found.experiment_id], filter_string=query, max_results=5000)
    for run in runs:
        for key, value in tags.items():
            client.set_tag(run.info.run_id, key, value)
    return len(runs)


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


@contextmanager
def stage_run(
    root: Path, experiment: str, stage: str, parent_run_id: str | None = None, tags: dict[str, str] | None = None
) -> Iterator[StageTracker]:
    """A run for one stage in `experiment`, nested under `parent_run_id` when the stage is part of a pipeline
    run (whose FLOW_RUN_TAG it and its children carry too).

    The registry changes with the stage's outputs: the versions registered inside the block get the
    `challenger` alias when the block ends normally (the stage runner swaps the outputs in inside
    it), and are deleted again when it raises, so a failed stage leaves versions and aliases as
    they were.
    """
    configure(root, experiment)
    inherited = {}
    if parent_run_id is not None:
        parent_tags = MlflowClient().get_run(parent_run_id).data.tags
        inherited = {key: parent_tags[key] for key in (FLOW_RUN_TAG,) if key in parent_tags}
    with mlflow.start_run(
        run_name=stage,
        parent_run_id=parent_run_id,
        nested=parent_run_id is not None,
        tags={"ms2rgb.stage": stage, **inherited, **_owner_tags(), **(tags or {})},
    ) as run:
        tracker = StageTracker(run.info.run_id, inherited=inherited)
        try:
            yield tracker
        except BaseException:  # Ctrl-C too: only a finished stage publishes what it registered
            tracker.pending.roll_back(tracker._client)
            raise
        tracker.pending.commit(tracker._client)
