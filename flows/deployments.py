"""The names of the project's Prefect deployments: `<flow>/<tracking.model_prefix>-<role>`.

A Prefect server knows a deployment by its flow's name and its own name. Projects that share a server
run the same flows (`pipeline`, `watch`, `retrain`), so the deployment's own name carries the project's
prefix (params.yaml `tracking.model_prefix`, which also names its registered models): each project
serves, starts and counts only its own deployments (`ms2rgb` gives `pipeline/ms2rgb-default`,
`watch/ms2rgb-landing`, `retrain/ms2rgb-on-new-scenes`).
"""

from __future__ import annotations

from typing import Literal

Role = Literal["pipeline", "watch", "retrain"]
# flow name -> what its deployment is for (the deployment's name after the prefix)
ROLES: dict[Role, str] = {"pipeline": "default", "watch": "landing", "retrain": "on-new-scenes"}


def deployment_name(prefix: str, flow: Role) -> str:
    """The deployment's own name, e.g. `ms2rgb-on-new-scenes` (what `flow.to_deployment` takes)."""
    return f"{prefix}-{ROLES[flow]}"


def full_name(prefix: str, flow: Role) -> str:
    """`<flow>/<deployment>`, what `prefect deployment run` and the API's read_deployment_by_name take."""
    return f"{flow}/{deployment_name(prefix, flow)}"


def all_names(prefix: str) -> tuple[str, ...]:
    """The full names of the three deployments `ms2rgb serve` serves, in the order it builds them."""
    return tuple(full_name(prefix, flow) for flow in ROLES)
