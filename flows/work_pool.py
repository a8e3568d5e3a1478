"""Deploy the project to a process work pool: prefect.yaml's three deployments (`ms2rgb deploy`, `make deploy`).

The other way to run the flows beside `make serve` (flows/serve.py): the server at PREFECT_API_URL keeps
pipeline/<prefix>-default, watch/<prefix>-landing and retrain/<prefix>-on-new-scenes on the process pool
prefect.yaml names, and a `prefect worker start --pool <pool>` started from the project's .venv runs them,
on this machine or another one that has the project at the same path. Each flow run is a subprocess of the
worker with the worker's Python (so it imports ms2rgb from the module-path entrypoints), started in the
project folder and given it as `root`, as `ms2rgb serve` gives it: the folder `prefect deploy` ran in.

`deploy` adds to `prefect deploy --all` what it cannot do alone:
- prefect.yaml cannot read params.yaml, so it carries the default model prefix and poll interval;
  `deploy` compares it with what `ms2rgb serve` would serve for this project's params.yaml
  (build_deployments) and stops with the line to change when they differ;
- it creates the process pool when the server lacks it;
- it runs `prefect deploy --all` in the project folder with PWD set to that folder, so prefect.yaml's
  `{{ $PWD }}` (filled in at deploy time) names the project whatever shell or `make -C` called it;
- it writes the retrain trigger's automation as `ms2rgb serve` does (install_trigger), not through
  prefect.yaml `triggers:` (see prefect.yaml).
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ms2rgb.flows.deployments import all_names, full_name
from ms2rgb.flows.serve import api_url, build_deployments, healthy, install_trigger
from ms2rgb.tasks.config import Params, load_params
from ms2rgb.tasks.errors import Ms2rgbError

PREFECT_FILE = "prefect.yaml"
POOL_TYPE = "process"  # flow runs as subprocesses of the worker: they see the project folder and its .venv
DEPLOY_TIMEOUT_S = 600.0  # `prefect deploy --all` imports the three flows; minutes on a busy small machine


@dataclass(frozen=True)
class Spec:
    """What prefect.yaml and build_deployments must agree on, per entrypoint."""

    name: str  # the deployment's own name, e.g. ms2rgb-default (flows/deployments.py)
    interval_s: float | None  # its schedule's interval in seconds; None: no schedule
    concurrency: str | None  # "<limit>/<collision strategy>", e.g. "1/ENQUEUE"; None: no limit
    parameters: tuple[str, ...]  # the names of the parameters it sets (values differ: `{{ $PWD }}` vs a path)


def read_prefect_yaml(root: Path) -> dict[str, Any]:
    """The mapping in <root>/prefect.yaml, with a `deployments` list."""
    path = root / PREFECT_FILE
    if not path.is_file():
        raise Ms2rgbError(f"{path}: no such file. Fix: copy the repository's {PREFECT_FILE} into the project")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise Ms2rgbError(f"{path}{where}: YAML syntax error. Fix: correct the file there") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("deployments"), list):
        raise Ms2rgbError(f"{path}: has no `deployments:` list. Fix: restore it from the repository's {PREFECT_FILE}")
    return raw


def _seconds(value: Any) -> float:
    """A schedule interval as prefect.yaml may write it (seconds, ISO 8601, HH:MM:SS), in seconds."""
    from pydantic import TypeAdapter

    return TypeAdapter(datetime.timedelta).validate_python(value).total_seconds()


def declared(raw: dict[str, Any]) -> dict[str, Spec]:
    """prefect.yaml's deployments by entrypoint."""
    specs = {}
    for entry in raw["deployments"]:
        schedules = entry.get("schedules") or []
        interval = schedules[0].get("interval") if schedules else None
        limit = entry.get("concurrency_limit")
        if isinstance(limit, dict):
            limit = f"{limit.get('limit')}/{limit.get('collision_strategy')}"
        specs[str(entry.get("entrypoint"))] = Spec(
            name=str(entry.get("name")),
            interval_s=None if interval is None else _seconds(interval),
            concurrency=None if limit is None else str(limit),
            parameters=tuple(sorted(entry.get("parameters") or {})),
        )
    return specs


def expected(root: Path, params: Params) -> dict[str, Spec]:
    """What `ms2rgb serve` serves for `params`, by entrypoint."""
    specs = {}
    for deployment in build_deployments(root, params):
        options = deployment.concurrency_options
        strategy = options.collision_strategy.value if options else None
        specs[deployment.entrypoint] = Spec(
            name=deployment.name,
            interval_s=deployment.schedules[0].schedule.interval.total_seconds() if deployment.schedules else None,
            concurrency=f"{deployment.concurrency_limit}/{strategy}" if deployment.concurrency_limit else None,
            parameters=tuple(sorted(deployment.parameters)),
        )
    return specs


def drift(raw: dict[str, Any], root: Path, params: Params) -> list[str]:
    """Where prefect.yaml differs from build_deployments for `params`: one sentence with its fix each."""
    have, want = declared(raw), expected(root, params)
    prefix, poll = params.tracking.model_prefix, params.landing.poll_seconds
    problems = [
        f"{PREFECT_FILE}: {entrypoint!r} is not the entrypoint of one of the project's deployments "
        f"({', '.join(want)}). Fix: correct or remove that deployment"
        for entrypoint in have.keys() - want.keys()
    ]
    for entrypoint, spec in want.items():
        found = have.get(entrypoint)
        if found is None:
            problems.append(
                f"{PREFECT_FILE}: no deployment has entrypoint {entrypoint} ({spec.name}). "
                f"Fix: restore it from the repository's {PREFECT_FILE}"
            )
            continue
        if found.name != spec.name:
            problems.append(
                f"{PREFECT_FILE}: the deployment of {entrypoint} is named {found.name!r}, but params.yaml "
                f"tracking.model_prefix={prefix!r} names it {spec.name!r}. Fix: rename it in {PREFECT_FILE}"
            )
        if found.interval_s != spec.interval_s:
            why = f"params.yaml landing.poll_seconds={poll}" if spec.interval_s else "`ms2rgb serve`: no schedule"
            problems.append(
                f"{PREFECT_FILE}: {spec.name}'s schedule interval is {found.interval_s} s, but {why}. "
                f"Fix: make its `schedules:` match ({spec.interval_s} s)"
            )
        if found.concurrency != spec.concurrency:
            problems.append(
                f"{PREFECT_FILE}: {spec.name}'s concurrency_limit is {found.concurrency}, `ms2rgb serve` uses "
                f"{spec.concurrency} (limit/collision_strategy). Fix: set it back in {PREFECT_FILE}"
            )
        if found.parameters != spec.parameters:
            problems.append(
                f"{PREFECT_FILE}: {spec.name} sets the parameters {list(found.parameters)}, `ms2rgb serve` sets "
                f"{list(spec.parameters)}. Fix: give it `parameters: {{root: *project}}` as in the repository's "
                f"{PREFECT_FILE}"
            )
    return problems


def pool_name(raw: dict[str, Any]) -> str:
    """The one work pool prefect.yaml's deployments name."""
    names = {str((entry.get("work_pool") or {}).get("name")) for entry in raw["deployments"]}
    if len(names) != 1 or names == {"None"}:
        raise Ms2rgbError(
            f"{PREFECT_FILE}: the deployments name the work pools {sorted(names)}, expected one. "
            "Fix: give every deployment the same `work_pool: name:`"
        )
    return names.pop()


def ensure_pool(name: str, url: str) -> str:
    """Create the process work pool `name` unless the server has it: "kept" or "created"."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            template = ProcessWorker.get_default_base_job_template()
            client.create_work_pool(WorkPoolCreate(name=name, type=POOL_TYPE, base_job_template=template))
            return "created"
    if pool.type != POOL_TYPE:
        raise Ms2rgbError(
            f"work pool {name!r} on {url} has type {pool.type!r}, not {POOL_TYPE!r}. Fix: name another pool "
            f"in {PREFECT_FILE} (and the Makefile's WORK_POOL), or delete that one"
        )
    return "kept"


def prefect_deploy(root: Path) -> None:
    """`prefect deploy --all` in `root`, with PWD = root (prefect.yaml's pull step)."""
    command = [str(Path(sys.executable).parent / "prefect"), "--no-prompt", "deploy", "--all"]
    env = {**os.environ, "PWD": str(root)}
    try:
        done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=DEPLOY_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise Ms2rgbError(
            f"`prefect deploy --all` in {root} did not finish in {DEPLOY_TIMEOUT_S:.0f} s. Fix: check that the "
            "server at PREFECT_API_URL answers, then `make deploy` again"
        ) from None
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise Ms2rgbError(f"`prefect deploy --all` in {root} exited {done.returncode}; it ends:\n{tail}")


def deploy(root: Path) -> dict[str, Any]:
    """Register prefect.yaml's deployments and the retrain trigger with the server at PREFECT_API_URL."""
    root = root.resolve()
    url = api_url()
    if not url:
        raise Ms2rgbError(
            "PREFECT_API_URL is not set: `ms2rgb deploy` registers the deployments with a server the workers reach "
            "too. Fix: set PREFECT_API_URL=http://<server>:4200/api (`make serve` starts one on this machine at "
            "http://127.0.0.1:4200/api)"
        )
    if not healthy(url, 30):
        raise Ms2rgbError(f"the Prefect server at {url} does not answer. Fix: start it, or fix PREFECT_API_URL")
    params = load_params(root)
    raw = read_prefect_yaml(root)
    problems = drift(raw, root, params)
    if problems:
        raise Ms2rgbError("; ".join(problems))
    pool = pool_name(raw)
    pool_state = ensure_pool(pool, url)
    prefect_deploy(root)
    prefix = params.tracking.model_prefix
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        retrain_id = client.read_deployment_by_name(full_name(prefix, "retrain")).id
    rerun = "restart your Prefect server, then `make deploy` again"
    trigger = install_trigger(root, prefix, retrain_id, url, rerun=rerun)
    return {
        "api_url": url,
        "pool": pool,
        "pool_state": pool_state,
        "deployments": all_names(prefix),
        "trigger": trigger,
    }
