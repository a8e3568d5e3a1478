"""Helpers of the slow tests that run real Prefect processes (tests/test_operations.py: `make serve`;
tests/test_work_pool.py: a worker): the venv's commands, the tiny project's champions and flow runs. The
loopback server itself is conftest's `prefect_api` fixture."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from conftest import DVC

PREFECT = str(Path(sys.executable).parent / "prefect")


def venv_env(**extra: str) -> dict[str, str]:
    """The environment of a subprocess: the venv's commands first, no tracking server, no telemetry."""
    env = {**os.environ, "PATH": f"{DVC.parent}{os.pathsep}{os.environ.get('PATH', '')}", **extra}
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    return env


def champions(root: Path) -> dict[str, int | None]:
    """The `champion` version of each registered model of a project with the repository's model prefix."""
    from ms2rgb.tasks import tracking
    from ms2rgb.tasks.config import model_name
    from ms2rgb.tasks.evaluate import MODELS

    names = [model_name("ms2rgb", stage) for stage in MODELS]  # the repository's tracking.model_prefix
    return {name: tracking.version_by_alias(root, name, "champion") for name in names}


def wait_for(predicate: Any, timeout: float, what: str, every: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def flow_runs(url: str, deployment: str = "ms2rgb-on-new-scenes") -> list[Any]:
    """The flow runs of one of the project's deployments (by the deployment's own name)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        found = client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment])))
    return list(found)
