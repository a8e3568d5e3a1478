"""The Prefect `pipeline` flow: the DVC stages in DAG order, under one MLflow parent run.

The parent run carries the Prefect flow run's id (tracking.FLOW_RUN_TAG), and so do the stage runs
nested under it and their children: a retrain finds the runs it made by that id (flows/retrain.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from ms2rgb.flows import dvc_state
from ms2rgb.flows.stages import STAGE_MODULES, run_stage
from ms2rgb.tasks import tracking
from ms2rgb.tasks.config import load_params


@task(cache_policy=NO_CACHE)
def stage_task(name: str, root: str, parent_run_id: str, force: bool) -> dict[str, Any] | None:
    logger = get_run_logger()
    path = Path(root)
    if not force and not dvc_state.is_stale(path, name):
        logger.info("stage %s is fresh according to dvc.lock: skipped", name)
        return None
    logger.info("stage %s: running", name)
    report = run_stage(name, path, parent_run_id)
    dvc_state.record(path, name)
    logger.info("stage %s: done, recorded in dvc.lock", name)
    return report


def current_flow_run_id() -> str | None:
    """The id of the Prefect flow run this code runs in (None outside one)."""
    from prefect.runtime import flow_run

    run_id = flow_run.id
    return str(run_id) if run_id else None


def stages_until(until: str | None) -> list[str]:
    names = list(STAGE_MODULES)
    if until is None:
        return names
    if until not in names:
        raise ValueError(f"unknown stage {until!r}; stages are {names}")
    return names[: names.index(until) + 1]


@flow(name="pipeline", log_prints=True)
def pipeline(
    root: str = ".",
    until: str | None = None,
    force: bool = False,
    skip: tuple[str, ...] = (),
    flow_run_id: str | None = None,
) -> dict[str, Any]:
    """Run every stale stage (all with force=True) up to `until`, except those in `skip`; return the reports.

    The MLflow runs carry `flow_run_id`: this flow run's own id, or the one a calling flow passes (a
    retrain runs this as a subflow, with an id of its own, and tags the runs made under its id)."""
    root = str(Path(root).resolve())
    params = load_params(Path(root))
    names = [n for n in stages_until(until) if n not in skip]
    if not force and not any(dvc_state.is_stale(Path(root), name) for name in names):
        get_run_logger().info("every stage is fresh according to dvc.lock: nothing to run, no MLflow run made")
        return dict.fromkeys(names)
    reports: dict[str, Any] = {}
    owner = flow_run_id or current_flow_run_id()
    tags = {"ms2rgb.trigger": "prefect", **({tracking.FLOW_RUN_TAG: owner} if owner else {})}
    with tracking.pipeline_run(Path(root), params.tracking.experiment, "pipeline", tags=tags) as parent:
        for name in names:
            reports[name] = stage_task.with_options(task_run_name=name)(name, root, parent, force)
    return reports
