"""Independent pieces of a stage as Prefect tasks on a task runner (params.yaml `compute`).

`run_all(fn, calls, ...)` returns `[fn(**call) for call in calls]`, in order. With `compute.workers`
1 that is literally the loop, in the stage's own process. With more, each call is a Prefect task
submitted to Prefect's process-pool runner or to prefect-dask's DaskTaskRunner (a local cluster of
`workers` processes, or the scheduler at `compute.dask_address`), so the calls show as task runs in
the Prefect UI and can spread over a cluster. Every call pins torch to `compute.cell_threads`
first, the serial loop's calls too: CPU reductions split by the thread count, so pinning it is what
keeps the numbers identical for any `workers`, and it keeps `workers` processes from each taking
every core. The stage's own work around the calls keeps the params' `threads`. There is no
thread-pool choice: a cell seeds torch's and numpy's process-wide generators, which threads would share.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Generic, TypeVar

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner

from ms2rgb.tasks.config import ComputeConfig
from ms2rgb.tasks.errors import Ms2rgbError
from ms2rgb.tasks.training.loop import make_deterministic, use_device
from ms2rgb.tasks.training.malloc import steady_malloc

R = TypeVar("R")
T = TypeVar("T")


class ProcessLocal(Generic[T]):
    """One value per process, for the key it last served: a stage's inputs (tiles, frozen models),
    built once by the stage's own process for the serial loop and once by each worker process, not
    once per call. One slot: a served process runs many stages, and each clears it after itself."""

    def __init__(self) -> None:
        self.key: str | None = None
        self.value: T | None = None

    def get(self, key: str, build: Callable[[], T]) -> T:
        if self.key != key or self.value is None:
            self.key, self.value = None, None  # a failed build leaves nothing half-made behind
            self.value, self.key = build(), key
        return self.value

    def put(self, key: str, value: T) -> None:
        self.key, self.value = key, value

    def clear(self) -> None:
        self.key, self.value = None, None


def pinned_call(fn: Callable[..., R], threads: int, kwargs: dict[str, Any], device: str = "auto") -> R:
    """`fn(**kwargs)` with torch on `threads` CPU threads and `device` (compute.device), wherever the
    runner put it, and glibc's malloc thresholds set (a Dask worker's nanny changed them)."""
    steady_malloc()
    make_deterministic(threads)
    use_device(device)
    return fn(**kwargs)


def api_url() -> str:
    """The Prefect API this process reports to, which worker processes must report to as well (else
    each would start a temporary server of its own): the configured one, or Prefect's temporary one."""
    configured = PREFECT_API_URL.value()
    if configured:
        return str(configured)
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the one Prefect's client starts when no API is configured
    server.start()
    return str(server.api_url)


def dask_runner(compute: ComputeConfig) -> TaskRunner:
    """prefect-dask's runner: the configured scheduler, or a local cluster of one-task worker processes."""
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as err:
        raise Ms2rgbError(
            "compute.task_runner: dask needs prefect-dask; run `pip install -e '.[dask]'` or set task_runner: processes"
        ) from err
    if compute.dask_address:
        return DaskTaskRunner(address=compute.dask_address)
    cluster = {"n_workers": compute.workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None}
    return DaskTaskRunner(cluster_kwargs=cluster)  # its workers inherit run_all's worker_env()


def task_runner(compute: ComputeConfig) -> TaskRunner:
    """The runner `compute.task_runner` names, `compute.workers` wide."""
    if compute.task_runner == "dask":
        return dask_runner(compute)
    return ProcessPoolTaskRunner(max_workers=compute.workers)


def oversubscription(compute: ComputeConfig) -> str | None:
    """A warning when local workers would ask for more threads than this machine has cores."""
    cores, threads = os.cpu_count() or 1, compute.cell_threads
    if compute.dask_address or compute.workers * threads <= cores:
        return None
    return (
        f"compute.workers {compute.workers} x cell_threads {threads} > {cores} cores: the cells will slow each "
        f"other down; set compute.cell_threads: {max(1, cores // compute.workers)} or fewer workers (other "
        f"cell_threads give slightly different numbers)"
    )


def worker_env() -> dict[str, str]:
    """What a worker process needs from Prefect's settings before a task's context reaches it: the API
    (else it starts a temporary server of its own), and quiet about task logs outside a flow run."""
    return {"PREFECT_API_URL": api_url(), "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore"}


@contextmanager
def inherited_env(values: dict[str, str]) -> Iterator[None]:
    """`values` set in the environment that processes started meanwhile inherit, restored after."""
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def literal(name: str) -> str:
    """`name` as a Prefect task-run name, which Prefect formats with the task's parameters: a brace in
    it would fail there, in a thread whose error never reaches the future (the caller waits forever)."""
    return name.replace("{", "{{").replace("}", "}}")


def run_all(
    fn: Callable[..., R], calls: Sequence[dict[str, Any]], names: Sequence[str], compute: ComputeConfig
) -> list[R]:
    """`fn(**call)` for every call, results in the calls' order; `names` label the Prefect task runs."""
    if compute.workers == 1:
        return serial(fn, calls, compute)
    warning = oversubscription(compute)
    if warning:
        print(f"warning: {warning}", flush=True)
    env = worker_env()
    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}), inherited_env(env):
        return submit_all(fn, calls, names, compute)


def serial(fn: Callable[..., R], calls: Sequence[dict[str, Any]], compute: ComputeConfig) -> list[R]:
    """The calls one after another in this process, on `compute.cell_threads`; the stage's own thread
    count comes back after."""
    own = torch.get_num_threads()
    try:
        return [pinned_call(fn, compute.cell_threads, call, device=compute.device) for call in calls]
    finally:
        torch.set_num_threads(own)


def submit_all(
    fn: Callable[..., R], calls: Sequence[dict[str, Any]], names: Sequence[str], compute: ComputeConfig
) -> list[R]:
    """Every call as a Prefect task on a fresh runner, waited for in the calls' order."""
    cell = task(name=getattr(fn, "__name__", "cell"), cache_policy=NO_CACHE, persist_result=False)(pinned_call)
    with task_runner(compute) as runner:
        futures = [
            runner.submit(
                cell.with_options(task_run_name=literal(name)),
                {
                    "fn": fn,
                    "threads": compute.cell_threads,
                    "kwargs": call,
                    "device": compute.device,
                },
            )
            for name, call in zip(names, calls, strict=True)
        ]
        return [future.result() for future in futures]
