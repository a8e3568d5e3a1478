"""The work-pool path (prefect.yaml, `ms2rgb deploy`, a worker) registers the same three deployments as
`make serve`, and a worker started apart from the project runs them there.

The fast tests read prefect.yaml, the Makefile and params.yaml only. The `slow` one uses real processes: a
`prefect server start` on 127.0.0.1 with a temporary PREFECT_HOME, `ms2rgb deploy` on a tiny project, then
`prefect deployment run pipeline/ms2rgb-default` and `prefect worker start --run-once`, which runs the whole
tiny pipeline: about two minutes on 2 cores, of which the pipeline takes one and the two deploys 40 s.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import DVC, REPO, make_project, run_checked
from helpers_params import repo_params
from helpers_prefect import PREFECT, champions, flow_runs, venv_env

from ms2rgb.flows import work_pool
from ms2rgb.flows.deployments import all_names, full_name
from ms2rgb.flows.serve import automation_name
from ms2rgb.tasks.errors import Ms2rgbError

MS2RGB = str(DVC.parent / "ms2rgb")
SET_WORKING_DIRECTORY = "prefect.deployments.steps.set_working_directory"
FLOWS = {  # entrypoint -> flow name, as `prefect deploy` finds it by importing the entrypoint
    "ms2rgb.flows.serve.locked_pipeline": "pipeline",
    "ms2rgb.flows.watch.watch": "watch",
    "ms2rgb.flows.retrain.retrain": "retrain",
}


def repo_prefect_yaml() -> dict[str, Any]:
    return work_pool.read_prefect_yaml(REPO)


# ---------------------------------------------------------------- prefect.yaml against build_deployments


def test_prefect_yaml_declares_what_serve_serves() -> None:
    raw, params = repo_prefect_yaml(), repo_params()
    assert work_pool.drift(raw, REPO, params) == []
    have = work_pool.declared(raw)
    assert have == work_pool.expected(REPO, params)  # names, entrypoints, the watch interval, the retrain limit
    assert sorted(f"{FLOWS[e]}/{spec.name}" for e, spec in have.items()) == sorted(all_names("ms2rgb"))
    assert [(FLOWS[e], s.interval_s, s.concurrency) for e, s in have.items()] == [
        ("pipeline", None, None),
        ("watch", params.landing.poll_seconds, None),
        ("retrain", None, "1/ENQUEUE"),
    ]


def test_prefect_yaml_commits_no_path_and_names_the_makefiles_pool() -> None:
    raw = repo_prefect_yaml()
    folder = "{{ $PWD }}"  # filled in at deploy time
    assert raw["pull"] == [{SET_WORKING_DIRECTORY: {"directory": folder}}]
    for entry in raw["deployments"]:
        assert entry["parameters"] == {"root": folder} and entry["work_pool"]["job_variables"]["working_dir"] == folder
    assert all("triggers" not in entry for entry in raw["deployments"])  # ms2rgb deploy writes the trigger
    makefile = (REPO / "Makefile").read_text()
    pools = re.findall(r"^WORK_POOL := (\S+)$", makefile, flags=re.MULTILINE)
    assert pools == [work_pool.pool_name(raw)] == ["ms2rgb"]


def test_a_project_whose_params_differ_is_told_which_line_to_change() -> None:
    raw = repo_prefect_yaml()
    problems = work_pool.drift(raw, REPO, repo_params(tracking__model_prefix="team-b", landing__poll_seconds=30))
    assert len(problems) == 4  # three names and the interval
    assert (
        "prefect.yaml: the deployment of ms2rgb.flows.serve.locked_pipeline is named 'ms2rgb-default', but "
        "params.yaml tracking.model_prefix='team-b' names it 'team-b-default'. Fix: rename it in prefect.yaml"
    ) in problems
    assert (
        "prefect.yaml: team-b-landing's schedule interval is 60.0 s, but params.yaml landing.poll_seconds=30. "
        "Fix: make its `schedules:` match (30.0 s)"
    ) in problems
    raw["deployments"][2]["concurrency_limit"] = {"limit": 2, "collision_strategy": "CANCEL_NEW"}
    del raw["deployments"][0]
    problems = work_pool.drift(raw, REPO, repo_params())
    assert problems == [
        "prefect.yaml: no deployment has entrypoint ms2rgb.flows.serve.locked_pipeline (ms2rgb-default). "
        "Fix: restore it from the repository's prefect.yaml",
        "prefect.yaml: ms2rgb-on-new-scenes's concurrency_limit is 2/CANCEL_NEW, `ms2rgb serve` uses 1/ENQUEUE "
        "(limit/collision_strategy). Fix: set it back in prefect.yaml",
    ]
    assert all("\n" not in p for p in problems)


def test_deploy_needs_a_server_and_says_how_to_get_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFECT_API_URL", "")
    with pytest.raises(Ms2rgbError, match=r"^PREFECT_API_URL is not set: .* Fix: set PREFECT_API_URL=http://"):
        work_pool.deploy(tmp_path)
    with pytest.raises(Ms2rgbError, match=r"prefect\.yaml: no such file\. Fix: copy the repository's prefect\.yaml"):
        work_pool.read_prefect_yaml(tmp_path)


# ---------------------------------------------------------------- a real worker


def read_deployments(url: str) -> dict[str, Any]:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        found = {name: client.read_deployment_by_name(name) for name in all_names("ms2rgb")}
        assert len(client.read_automations_by_name(automation_name("ms2rgb"))) == 1
    return found


def pause(url: str, deployment_id: Any) -> None:
    """Pause a deployment: its schedule stops, and every run it had scheduled goes. The pause itself
    leaves a run that is already Late (its start time passed while a slow `deploy` ran), which the
    one-run worker would then take before the pipeline run (seen once in CI)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.settings import PREFECT_API_URL, temporary_settings

    waiting = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])))
    with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        client.pause_deployment(deployment_id)
        ours = DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
        for run in client.read_flow_runs(deployment_filter=ours, flow_run_filter=waiting):  # Late is a Scheduled type
            client.delete_flow_run(run.id)


@pytest.mark.slow
def test_a_worker_picks_up_the_deployed_pipeline_and_completes_it(prefect_api: str, tmp_path: Path) -> None:
    root = make_project(tmp_path / "project").resolve()
    elsewhere = tmp_path / "elsewhere"  # where the commands start: the project folder comes from the deployment
    elsewhere.mkdir()
    env = venv_env(PREFECT_API_URL=prefect_api, PREFECT_HOME=str(tmp_path / "prefect-home"), PWD=str(elsewhere))
    started = time.monotonic()
    deployed = run_checked([MS2RGB, "--root", str(root), "deploy"], cwd=elsewhere, env=env, timeout=600).stdout
    assert "work pool 'ms2rgb' (process): created" in deployed and "retrain trigger: created" in deployed
    deployments = read_deployments(prefect_api)
    for deployment in deployments.values():
        assert deployment.work_pool_name == "ms2rgb"
        assert deployment.parameters == {"root": str(root)}  # the folder it was deployed from, not `elsewhere`
        assert deployment.job_variables == {"working_dir": str(root)}
    watch, retrain = deployments[full_name("ms2rgb", "watch")], deployments[full_name("ms2rgb", "retrain")]
    assert watch.schedules[0].schedule.interval.total_seconds() == 60
    assert retrain.global_concurrency_limit.limit == 1
    assert str(retrain.concurrency_options.collision_strategy.value) == "ENQUEUE"
    deploy_s = time.monotonic() - started
    again = run_checked([MS2RGB, "--root", str(root), "deploy"], cwd=elsewhere, env=env, timeout=600).stdout
    assert "(process): kept" in again and "retrain trigger: kept" in again  # `make deploy` again writes no automation
    redeployed = read_deployments(prefect_api)
    assert [d.id for d in redeployed.values()] == [d.id for d in deployments.values()]  # updated in place
    pause(prefect_api, watch.id)  # its schedule would offer the one-run worker a second run to take first

    run_checked([PREFECT, "deployment", "run", "pipeline/ms2rgb-default"], cwd=elsewhere, env=env, timeout=120)
    (scheduled,) = flow_runs(prefect_api, "ms2rgb-default")
    command = [PREFECT, "worker", "start", "--pool", "ms2rgb", "--run-once", "--limit", "1", "--name", "test-worker"]
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:  # its own session, so a timeout ends the flow run's process too
        worker = subprocess.Popen(
            command, cwd=elsewhere, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:  # --run-once --limit 1: it takes the scheduled run, waits for it to finish, and exits
        assert worker.wait(timeout=420) == 0, log.read_text()[-4000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=30)
    (finished,) = flow_runs(prefect_api, "ms2rgb-default")
    assert finished.id == scheduled.id and finished.work_pool_name == "ms2rgb"
    assert finished.state.is_completed(), f"{finished.state}\n{log.read_text()[-4000:]}"
    # The pipeline ran in the project folder: every stage recorded, every model has a champion.
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(yaml.safe_load((root / "dvc.yaml").read_text())["stages"])
    assert (root / "reports" / "evaluate.json").is_file()
    assert all(champions(root).values()), champions(root)
    assert not (elsewhere / "dvc.lock").exists() and not (elsewhere / "mlflow.db").exists()
    print(f"work pool: deploy {deploy_s:.0f} s; pipeline on the worker {finished.total_run_time}")
