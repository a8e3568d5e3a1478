"""Serve the project's deployments from one long-running process; start and stop a local server for them.

Three deployments, each made with `flow.to_deployment` and served together by one `prefect.serve`; their
names carry the project's `tracking.model_prefix` (flows/deployments.py; `ms2rgb` below), and so does the
retrain trigger's automation, so projects sharing a Prefect server keep theirs apart:

| deployment | runs | started by |
| --- | --- | --- |
| `pipeline/ms2rgb-default` | the stale stages, under the project lock | hand: UI or `prefect deployment run` |
| `watch/ms2rgb-landing` | one poll of the landing location | an interval schedule of `landing.poll_seconds` |
| `retrain/ms2rgb-on-new-scenes` | stale stages after new scenes, promotion | this project's `ms2rgb.scene.landed` |

`retrain/ms2rgb-on-new-scenes` has a deployment concurrency limit of 1 with collision strategy ENQUEUE: a
second retrain waits (state `AwaitingConcurrencySlot`) until the first has finished.

Why `prefect.serve` with `to_deployment` for the one-command path: one process on the project's
machine, nothing else to install or configure (no work pool, no worker, no image or code storage); each
flow run is a subprocess of it that sees the project's files and `.venv`, which is exactly what the
pipeline needs. `make stop` (or killing that process) ends the runs it started. The other path,
prefect.yaml on a process work pool (`make deploy`, then `prefect worker start`; flows/work_pool.py),
registers the same three deployments for workers that run apart from this process (tests/test_work_pool.py
keeps the two equal).

Why the retrain trigger is created here and not passed as `triggers=` to `to_deployment`: `serve`
would delete and re-create the automation at every start, and on a SQLite server every automation
write can deadlock the server's event loop (PrefectHQ/prefect#23055: the write's after-commit
listener blocks the loop while it waits for a lock held by the triggers service on that same loop).
`ensure_automation` writes it only when it is missing or differs (so a restart writes nothing), and
checks that the server still answers after a write. The automation is the one
`DeploymentEventTrigger.as_automation()` builds, owned by the project's resource instead of the
deployment so that `serve` leaves it alone.

`detach` / `stop` (what `make serve` / `make stop` call) start a Prefect server bound to 127.0.0.1,
with PREFECT_HOME under `<project>/.prefect/`, its SQLite database there too (or the database
PREFECT_API_DATABASE_CONNECTION_URL names, e.g. a team's PostgreSQL) and analytics off, unless
PREFECT_API_URL names a server already; then the `ms2rgb serve` process. Pid files and logs are kept in
`<project>/.prefect/serve/` (git-ignored).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from prefect import flow

from ms2rgb.flows.deployments import all_names, deployment_name, full_name
from ms2rgb.flows.lock import project_lock
from ms2rgb.flows.pipeline import pipeline
from ms2rgb.flows.retrain import retrain
from ms2rgb.flows.watch import EVENT, project_resource, watch
from ms2rgb.tasks.config import Params, load_params
from ms2rgb.tasks.errors import Ms2rgbError

RUN_DIR = Path(".prefect") / "serve"  # pid files and logs of `make serve`
HOST = "127.0.0.1"
HEALTH_AFTER_WRITE_S = 20.0  # how long the server may take to answer again after an automation write
ISSUE_23055 = "https://github.com/PrefectHQ/prefect/issues/23055"


def api_url() -> str | None:
    """The Prefect API this process talks to (PREFECT_API_URL or the active profile's), if any."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def healthy(url: str, timeout: float) -> bool:
    """Whether `<url>/health` answers within `timeout` seconds (polling)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=5) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)


# ---------------------------------------------------------------- the deployments


def automation_name(prefix: str) -> str:
    """The retrain trigger's automation, per project: `ms2rgb: retrain on ms2rgb.scene.landed` for `ms2rgb`.
    ensure_automation replaces automations of this name, so another project's name must differ."""
    return f"{prefix}: retrain on {EVENT}"


@flow(name="pipeline", log_prints=True)
def locked_pipeline(root: str = ".", until: str | None = None, force: bool = False, wait: float = 3600.0) -> Any:
    """The `pipeline` flow's body under the project lock, as `ms2rgb run` runs it: a run started from the
    UI waits for a retrain or a poll instead of writing beside it (pipeline/<prefix>-default serves this)."""
    path = Path(root).resolve()
    with project_lock(path, "the served pipeline deployment", wait):
        return pipeline.fn(root=str(path), until=until, force=force)


def build_deployments(root: Path, params: Params) -> list[Any]:
    """pipeline/<prefix>-default, watch/<prefix>-landing and retrain/<prefix>-on-new-scenes for the project at
    `root` (prefix: params tracking.model_prefix)."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.types.entrypoint import EntrypointType

    prefix = params.tracking.model_prefix
    common: dict[str, Any] = {"parameters": {"root": str(root)}, "entrypoint_type": EntrypointType.MODULE_PATH}
    return [
        locked_pipeline.to_deployment(
            deployment_name(prefix, "pipeline"),
            description="The whole pipeline: the stages DVC finds stale.",
            **common,
        ),
        watch.to_deployment(
            deployment_name(prefix, "watch"),
            interval=datetime.timedelta(seconds=params.landing.poll_seconds),
            description=f"One poll of {params.landing.location}: new scenes are ingested and announced.",
            **common,
        ),
        retrain.to_deployment(
            deployment_name(prefix, "retrain"),
            concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
            description=f"Started by {EVENT}: the stale stages, evaluation and promotion; one at a time.",
            **common,
        ),
    ]


def retrain_trigger(root: Path, prefix: str) -> Any:
    """The event trigger of retrain/<prefix>-on-new-scenes: any `ms2rgb.scene.landed` of this project."""
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    return DeploymentEventTrigger(
        name=automation_name(prefix),
        description=f"Runs {full_name(prefix, 'retrain')} for {root} when watch announces new scenes.",
        expect={EVENT},
        match={"prefect.resource.id": project_resource(root)["prefect.resource.id"]},
        parameters={"scene_ids": "{{ event.payload.scene_ids }}"},
    )


def _spec(automation: Any) -> dict[str, Any]:
    """What makes two automations the same, ids aside (the API does not return the owner)."""
    dumped = automation.model_dump(mode="json", include={"name", "enabled", "trigger", "actions"})
    dumped["trigger"].pop("id", None)
    dumped["trigger"]["expect"] = sorted(dumped["trigger"].get("expect") or [])
    return dumped


def ensure_automation(root: Path, prefix: str, deployment_id: Any) -> str:
    """Create the retrain trigger's automation unless an identical one exists: "kept" or "created"."""
    from prefect.client.orchestration import get_client

    trigger = retrain_trigger(root, prefix)
    trigger.set_deployment_id(deployment_id)
    wanted = trigger.as_automation()
    wanted.owner_resource = project_resource(root)["prefect.resource.id"]
    with get_client(sync_client=True) as client:
        existing = client.read_automations_by_name(automation_name(prefix))
        if len(existing) == 1 and _spec(existing[0]) == _spec(wanted):
            return "kept"
        for automation in existing:
            client.delete_automation(automation.id)
        client.create_automation(wanted)
    return "created"


def install_trigger(root: Path, prefix: str, deployment_id: Any, url: str, rerun: str) -> str:
    """ensure_automation, then a check that the server at `url` still answers (see the module docstring);
    `rerun` is the fix that restarts it. Shared by `ms2rgb serve` and `ms2rgb deploy` (flows/work_pool.py)."""
    automation = ensure_automation(root, prefix, deployment_id)
    if automation != "kept" and not healthy(url, HEALTH_AFTER_WRITE_S):
        raise Ms2rgbError(
            f"the Prefect server at {url} stopped answering right after the retrain trigger's "
            f"automation was written: the SQLite automations deadlock ({ISSUE_23055}). The automation is stored, "
            f"so a restart writes none. Fix: {rerun}"
        )
    return automation


def serve(root: Path) -> None:
    """Register the three deployments and serve them until interrupted (the `ms2rgb serve` command)."""
    import prefect

    root = root.resolve()
    url = api_url()
    if not url:
        raise Ms2rgbError(
            "PREFECT_API_URL is not set, and served deployments need a Prefect server that "
            "outlives this command. Fix: `make serve` (starts a local server, then serves), or start one "
            f"(`prefect server start --host {HOST}`) and set PREFECT_API_URL=http://{HOST}:4200/api"
        )
    if not healthy(url, 30):
        raise Ms2rgbError(f"the Prefect server at {url} does not answer. Fix: start it, or fix the URL")
    params = load_params(root)
    prefix = params.tracking.model_prefix
    deployments = build_deployments(root, params)
    retrain_id = deployments[2].apply()
    automation = install_trigger(
        root, prefix, retrain_id, url, rerun="`make stop && make serve` (or restart your server, then `ms2rgb serve`)"
    )
    print(f"serving {', '.join(all_names(prefix))}", flush=True)
    print(f"retrain trigger ({automation_name(prefix)!r}): {automation}", flush=True)
    prefect.serve(*deployments)


# ---------------------------------------------------------------- make serve / make stop


def _run_dir(root: Path) -> Path:
    return root / RUN_DIR


def _pid(path: Path, marker: str) -> int | None:
    """The live process recorded in a pid file, if its command line still contains `marker`."""
    try:
        pid = int(path.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists() and marker not in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"):
        return None  # the pid was recycled by another program
    return pid


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _spawn(command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """A background process in its own session (so `stop` can end it and its children together)."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )


def server_env(root: Path) -> dict[str, str]:
    """Environment of a project-local server: PREFECT_HOME under the project, analytics off, bound to
    127.0.0.1; its database is SQLite under the project unless PREFECT_API_DATABASE_CONNECTION_URL names
    one (a team's PostgreSQL: README, "Team services")."""
    home = root / ".prefect"
    database = os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL") or f"sqlite+aiosqlite:///{home / 'prefect.db'}"
    return {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_DATABASE_CONNECTION_URL": database,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_API_HOST": HOST,
    }


def start_server(root: Path, port: int, ui: bool = True, timeout: float = 180.0) -> str:
    """`prefect server start` on 127.0.0.1:`port` in the background; its API URL once it answers."""
    run_dir = _run_dir(root)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not _port_free(port):
        raise Ms2rgbError(f"port {port} on {HOST} is in use. Fix: `make serve PREFECT_PORT=<another port>`")
    prefect_cli = str(Path(sys.executable).parent / "prefect")
    command = [prefect_cli, "server", "start", "--host", HOST, "--port", str(port), "--analytics-off"]
    process = _spawn(command + ([] if ui else ["--no-ui"]), run_dir / "server.log", server_env(root))
    (run_dir / "server.pid").write_text(f"{process.pid}\n")
    url = f"http://{HOST}:{port}/api"
    deadline = time.monotonic() + timeout
    while not healthy(url, 2):
        if process.poll() is not None or time.monotonic() > deadline:
            _stop_one(run_dir / "server.pid", "prefect")
            log = run_dir / "server.log"
            raise Ms2rgbError(f"the Prefect server did not start; {log} ends:\n{_tail(log)}")
    return url


def detach(root: Path, port: int, ui: bool = True, timeout: float = 300.0) -> dict[str, Any]:
    """`make serve`: a server (unless PREFECT_API_URL names one), then `ms2rgb serve`, both in the background."""
    root = root.resolve()
    prefix = load_params(root).tracking.model_prefix  # a params mistake stops here, not in a background log
    run_dir = _run_dir(root)
    run_dir.mkdir(parents=True, exist_ok=True)
    running = _pid(run_dir / "serve.pid", "serve")
    if running:
        raise Ms2rgbError(f"{root}: already served by pid {running}. Fix: `make stop` first")
    url = os.environ.get("PREFECT_API_URL")
    started = url is None
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    if url is None:
        url = start_server(root, port, ui)
        env |= {"PREFECT_API_URL": url, "PREFECT_HOME": str(root / ".prefect")}
    (run_dir / "api_url").write_text(url + "\n")
    command = [sys.executable, "-m", "ms2rgb.flows.cli", "--root", str(root), "serve"]
    process = _spawn(command, run_dir / "serve.log", env)
    (run_dir / "serve.pid").write_text(f"{process.pid}\n")
    deadline = time.monotonic() + timeout
    while not _registered(url, prefix):
        if process.poll() is not None or time.monotonic() > deadline:
            stop(root)
            log = run_dir / "serve.log"
            raise Ms2rgbError(f"`ms2rgb serve` did not come up; {log} ends:\n{_tail(log)}")
        time.sleep(1)
    return {
        "api_url": url,
        "server_started": started,
        "serve_pid": process.pid,
        "logs": str(run_dir),
        "deployments": all_names(prefix),
    }


def _registered(url: str, prefix: str) -> bool:
    """Whether the server knows all three deployments of the project and its retrain automation."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    try:
        with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
            for name in all_names(prefix):
                client.read_deployment_by_name(name)
            return bool(client.read_automations_by_name(automation_name(prefix)))
    except Exception:
        return False


def _stop_one(pid_file: Path, marker: str, grace: float = 30.0) -> int | None:
    """SIGTERM the recorded process's session, SIGKILL it after `grace` seconds; the pid, if one ran."""
    pid = _pid(pid_file, marker)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while not _gone(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not _gone(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            while not _gone(pid) and time.monotonic() < deadline + 10:
                time.sleep(0.2)
    pid_file.unlink(missing_ok=True)
    return pid


def _gone(pgid: int) -> bool:
    """Whether no process of the session `pgid` is left (reaping its leader when it is our child)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pgid, os.WNOHANG)
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def stop(root: Path) -> dict[str, int | None]:
    """`make stop`: end `ms2rgb serve` (its flow runs with it), then the server `make serve` started."""
    run_dir = _run_dir(root.resolve())
    stopped = {
        "serve": _stop_one(run_dir / "serve.pid", "serve"),
        "server": _stop_one(run_dir / "server.pid", "prefect"),
    }
    (run_dir / "api_url").unlink(missing_ok=True)
    return stopped
