"""Champion/challenger decisions: move `champion` only for a real gain with no real regression.

Pure functions over metric dicts; the evaluate stage and `ms2rgb promote` apply the decision to
the MLflow registry (aliases and version tags) only after every evaluation has finished.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ms2rgb.tasks.evaluation.scoring import HEADLINE

FIRST, PROMOTED, HELD, FORCED = "first", "promoted", "held", "forced"


@dataclass
class Decision:
    """What happened to one registered model's champion alias."""

    decision: str  # first | promoted | held | forced
    champion: int  # the champion version after the decision
    challenger: int  # the version that was evaluated against it
    reasons: list[str]
    metrics: dict[str, Any] = field(default_factory=dict)  # {"challenger": {...}, "champion": {...} | None}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _regressions(name: str, new: dict[str, float], old: dict[str, float], limit: float) -> list[str]:
    out = []
    for metric in HEADLINE[name][1]:
        key, lower_better = metric.lstrip("-"), metric.startswith("-")
        loss = (new[key] - old[key]) if lower_better else (old[key] - new[key])
        if loss > limit:
            out.append(f"{key} regressed by {loss:.4f} (> promote.max_regression {limit})")
    return out


def decide(
    name: str,
    challenger: int,
    new: dict[str, float],
    champion: int | None,
    old: dict[str, float] | None,
    min_gain: float,
    max_regression: float,
    force: bool = False,
) -> Decision:
    """Compare the challenger's figures `new` with the champion's `old` (same test data)."""
    metrics = {"challenger": new, "champion": old}
    head = HEADLINE[name][0]
    if force:
        return Decision(FORCED, challenger, challenger, ["forced by hand (ms2rgb promote --force)"], metrics)
    if champion is None:
        return Decision(FIRST, challenger, challenger, ["no champion yet: the first version becomes it"], metrics)
    if champion == challenger:
        return Decision(HELD, champion, challenger, ["the challenger is the champion already"], metrics)
    if old is None:
        raise ValueError(f"{name}: champion v{champion} has no figures to compare with")
    gain = new[head] - old[head]
    reasons = [f"{head} {old[head]:.4f} -> {new[head]:.4f} ({gain:+.4f}; promote.min_gain {min_gain})"]
    regressions = _regressions(name, new, old, max_regression)
    if gain < min_gain or regressions:
        if gain < min_gain:
            reasons.append(f"{head} gain {gain:+.4f} is below promote.min_gain {min_gain}")
        return Decision(HELD, champion, challenger, reasons + regressions, metrics)
    return Decision(PROMOTED, challenger, challenger, reasons, metrics)
