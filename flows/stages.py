"""The stage registry: one function per stage, called alike by `dvc repro` and the Prefect flow."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ms2rgb.tasks import tracking
from ms2rgb.tasks.config import Params, load_params
from ms2rgb.tasks.data.artifacts import stage_dir, staging_dir
from ms2rgb.tasks.data.atomic import swap_in_dir, write_json_atomic
from ms2rgb.tasks.errors import Ms2rgbError
from ms2rgb.tasks.tracking.quiet import QuietTracker
from ms2rgb.tasks.training import distributed
from ms2rgb.tasks.training.loop import make_deterministic, pick_device, use_device

StageFn = Callable[[Path, Params, tracking.StageTracker], dict[str, Any]]

# DAG order. Each entry names the tasks module whose `run(root, params, tracker)` is the stage.
STAGE_MODULES: dict[str, str] = {
    "prepare": "ms2rgb.tasks.prepare",
    "validate": "ms2rgb.tasks.validate",
    "teacher": "ms2rgb.tasks.teacher",
    "matcher": "ms2rgb.tasks.matcher",
    "pairs": "ms2rgb.tasks.pairs",
    "student": "ms2rgb.tasks.student",
    "compare": "ms2rgb.tasks.compare",
    "detector": "ms2rgb.tasks.detector",
    "evaluate": "ms2rgb.tasks.evaluate",
}
REPORTS_DIR = "reports"


def stage_function(name: str) -> StageFn:
    if name not in STAGE_MODULES:
        raise Ms2rgbError(f"unknown stage {name!r}; stages are {list(STAGE_MODULES)}")
    return importlib.import_module(STAGE_MODULES[name]).run


def write_report(root: Path, name: str, report: dict[str, Any]) -> Path:
    """reports/<stage>.json, written atomically (it is a DVC metrics file)."""
    path = root / REPORTS_DIR / f"{name}.json"
    write_json_atomic(path, report, default=str)
    return path


def _numeric(report: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def run_stage(name: str, root: Path, parent_run_id: str | None = None) -> dict[str, Any]:
    """Run one stage in its own MLflow run and write reports/<name>.json.

    A stage that fails with a report attached (e.g. a failed validation) still writes it,
    so the user can read what went wrong; then the error propagates and stops the pipeline.
    Models the stage registered get their `challenger` alias only as the stage run closes, after
    its outputs were swapped in and its report written; any failure up to then (the stage, the
    swap, the report) deletes those versions again (tracking.stage_run), so the registry changes
    together with the outputs or not at all.
    """
    fn = stage_function(name)
    params = load_params(root)
    nproc = params.compute.nproc
    if nproc > 1 and name in distributed.DISTRIBUTED_STAGES and not distributed.under_torchrun():
        return run_under_torchrun(name, root, nproc, parent_run_id)
    make_deterministic(max(1, params.threads // distributed.world_size()))  # the processes share the cores
    use_device(params.compute.device)
    distributed.join(pick_device())
    try:
        if not distributed.is_writer():
            fn(root, params, QuietTracker())  # trains in step with process 0, which writes and logs
            return {}
        return _tracked(name, fn, root, params, parent_run_id)
    finally:
        distributed.leave()


def run_under_torchrun(name: str, root: Path, nproc: int, parent_run_id: str | None) -> dict[str, Any]:
    """Run stage `name` as `nproc` data-parallel processes (compute.nproc) and return process 0's report.

    `--standalone` gives the processes a rendezvous on this machine; each runs `run_stage` again
    (flows/torchrun_stage.py), which sees torchrun's environment and joins the group.
    """
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "ms2rgb.flows.torchrun_stage", name, str(root), parent_run_id or "",
    ]  # fmt: skip
    print(f"{name}: training on {nproc} processes (compute.nproc) under torchrun", flush=True)
    code = subprocess.run(command, cwd=root, check=False).returncode
    if code != 0:
        raise Ms2rgbError(
            f"stage {name} failed in its torchrun processes (exit code {code}; the first error is printed above); "
            "fix it, or set compute.nproc: 1 to train in one process"
        )
    return json.loads((root / REPORTS_DIR / f"{name}.json").read_text())


def _tracked(name: str, fn: StageFn, root: Path, params: Params, parent_run_id: str | None) -> dict[str, Any]:
    """The stage in its MLflow run: outputs swapped in, report written, only after it succeeded."""
    with tracking.stage_run(root, params.tracking.experiment, name, parent_run_id) as tracker:
        try:
            report = fn(root, params, tracker)
        except Ms2rgbError as exc:
            if exc.report is not None:
                tracker.log_artifact(write_report(root, name, exc.report))
            raise
        staging = staging_dir(root, name)
        if staging.exists():  # the stage's outputs replace the stored ones only now, whole
            swap_in_dir(staging, stage_dir(root, name))
        path = write_report(root, name, report)
        tracker.log_metrics(_numeric(report))
        tracker.log_artifact(path)
    return report
