"""The Prefect `watch` flow: one poll of the landing location; new scenes are announced with an event.

`watch` holds the project lock while it polls (flows/landing.py), so two polls, or a poll and a
retrain, never touch the pool at once, and no scene is ingested twice. Scenes that joined the pool
are announced as the Prefect event `ms2rgb.scene.landed` (payload `scene_ids`), about this project's
resource; the `retrain/<prefix>-on-new-scenes` deployment's trigger (flows/serve.py) starts `retrain` on it.
A poll that finds nothing new emits nothing, so it starts no run and makes no model version. The
one exception: scenes that a killed retrain left untrained are announced again, once no retrain is
queued (at most ledger.MAX_RETRAIN_ATTEMPTS times, flows/ledger.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow

from ms2rgb.flows import landing, ledger
from ms2rgb.flows.deployments import deployment_name
from ms2rgb.flows.lock import ProjectBusy, project_lock
from ms2rgb.tasks.config import load_params

EVENT = "ms2rgb.scene.landed"


def project_resource(root: Path) -> dict[str, str]:
    """The Prefect resource the events are about: this project, named by its resolved path."""
    root = root.resolve()
    return {
        "prefect.resource.id": f"ms2rgb.project.{hashlib.sha256(str(root).encode()).hexdigest()[:16]}",
        "prefect.resource.name": root.name,
        "ms2rgb.root": str(root),
    }


def scan(
    root: Path, wait: float, progress: Callable[[str], None] = print
) -> tuple[landing.PollResult, list[str]] | None:
    """One landing poll under the project lock, and the scenes still waiting for a retrain; None when
    another command (a retrain, `ms2rgb run`) keeps the project longer than `wait` seconds."""
    root = root.resolve()
    params = load_params(root)
    try:
        with project_lock(root, "ms2rgb watch", wait):
            return landing.poll(root, params, progress), ledger.awaiting_retrain(root)
    except ProjectBusy as exc:
        progress(f"watch: {exc}. Not polled; the next poll looks again")
        return None


def retrain_queued(prefix: str) -> bool | None:
    """Whether a run of this project's retrain/<prefix>-on-new-scenes is scheduled, waiting for its slot,
    pending or running (another project's retrain on the same server does not count); None when the API
    cannot say (then nothing is announced again)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterName,
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    active = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING, StateType.PAUSED, StateType.CANCELLING]
    try:
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=["retrain"])),
                deployment_filter=DeploymentFilter(
                    name=DeploymentFilterName(any_=[deployment_name(prefix, "retrain")])
                ),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=active))),
                limit=1,
            )
    except Exception as exc:  # any API trouble: do not guess
        print(f"watch: cannot tell whether a retrain is queued ({exc}); nothing announced again")
        return None
    return bool(runs)


def announce(root: Path, scene_ids: list[str], again: bool) -> str | None:
    """Emit `ms2rgb.scene.landed` for `scene_ids`; the event's id, or None when events are off."""
    from prefect.events import emit_event

    event = emit_event(
        EVENT, resource=project_resource(root), payload={"scene_ids": scene_ids, "announced_again": again}
    )
    return str(event.id) if event is not None else None


@flow(name="watch", log_prints=True)
def watch(root: str = ".", wait: float = 30.0) -> dict[str, Any]:
    """Poll the landing location once; announce the scenes that joined the pool."""
    path = Path(root).resolve()
    scanned = scan(path, wait)
    if scanned is None:
        return {"status": "busy", "announced": [], "event_id": None}
    result, awaiting = scanned
    scenes, again = result.ingested, False
    if not scenes and awaiting and retrain_queued(load_params(path).tracking.model_prefix) is False:
        scenes, again = awaiting, True
        print(f"watch: {awaiting} were ingested but no retrain finished with them and none is queued: announced again")
    event_id = announce(path, scenes, again) if scenes else None
    summary: dict[str, Any] = {"status": "polled", "announced": scenes, "announced_again": again, "event_id": event_id}
    for status in ("ingested", "quarantined", "duplicate", "settling", "refused"):
        summary[status] = [o.name for o in result.named(status)]
    counts = {k: len(v) for k, v in summary.items() if isinstance(v, list) and k != "announced"}
    print(f"watch: {result.location}: {counts}; announced {scenes or 'nothing'}")
    return summary
