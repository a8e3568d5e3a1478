"""Champion/challenger decisions: move `champion` only for an evident gain with no real regression.

Evident: both models are scored on the same held-out tiles, and the lower end of the paired 95 %
bootstrap interval of the headline gain (tasks/evaluation/evidence.py) must lie above
`promote.min_gain`; a point estimate that beats the champion by noise is held. The other tracked
metrics must not get worse by more than `promote.max_regression` (point estimates: the cautious
side). Pure functions; the evaluate stage and `ms2rgb promote` apply the decision to the MLflow
registry (aliases and version tags) only after every evaluation has finished.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ms2rgb.tasks.config import PromoteConfig
from ms2rgb.tasks.evaluation.evidence import Gain, metric_name, paired_gain
from ms2rgb.tasks.evaluation.scoring import HEADLINE, Scored, headline

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


def _regressions(kind: str, new: dict[str, float], old: dict[str, float], limit: float) -> list[str]:
    out = []
    for metric in HEADLINE[kind][1]:
        key, lower_better = metric.lstrip("-"), metric.startswith("-")
        loss = (new[key] - old[key]) if lower_better else (old[key] - new[key])
        if loss > limit:
            out.append(f"{key} regressed by {loss:.4f} (> promote.max_regression {limit})")
    return out


def decide(
    kind: str,
    challenger: int,
    new: dict[str, float],
    champion: int | None,
    old: dict[str, float] | None,
    min_gain: float,
    max_regression: float,
    force: bool = False,
    gain: Gain | None = None,
) -> Decision:
    """Compare the challenger's figures `new` with the champion's `old`, and the paired `gain` of the
    headline metric on the same test tiles (needed whenever there is a champion to compare with).
    `kind` is the stage that trains the model (HEADLINE's key), whatever name it is registered under."""
    metrics = {"challenger": new, "champion": old}
    head = HEADLINE[kind][0]
    if force:
        return Decision(FORCED, challenger, challenger, ["forced by hand (ms2rgb promote --force)"], metrics)
    if champion is None:
        return Decision(FIRST, challenger, challenger, ["no champion yet: the first version becomes it"], metrics)
    if champion == challenger:
        return Decision(HELD, champion, challenger, ["the challenger is the champion already"], metrics)
    if old is None or gain is None:
        raise ValueError(f"{kind}: champion v{champion} has no figures or paired gain to compare with")
    reasons = [f"{metric_name(head)} {old[head]:.4f} -> {new[head]:.4f}; {gain.describe()}"]
    regressions = _regressions(kind, new, old, max_regression)
    evident = gain.low > min_gain
    if not evident:
        reasons.append(
            f"the interval's lower end {gain.low:+.4f} is not above promote.min_gain {min_gain}: "
            "no evident gain over the champion"
        )
    if not evident or regressions:
        return Decision(HELD, champion, challenger, reasons + regressions, metrics)
    reasons.append(f"the interval's lower end {gain.low:+.4f} is above promote.min_gain {min_gain}")
    return Decision(PROMOTED, challenger, challenger, reasons, metrics)


def weigh(
    kind: str,
    challenger: int,
    new: Scored,
    champion: int | None,
    old: Scored | None,
    rule: PromoteConfig,
    samples: int,
    seed: int,
    force: bool = False,
) -> Decision:
    """decide() on two scored models: their figures, and the paired bootstrap (`samples` resamples,
    `seed`) of the headline gain from their per-tile outcomes on the same tiles."""
    head = HEADLINE[kind][0]
    gain = None if old is None else paired_gain(head, new.outcomes, old.outcomes, samples, seed)
    new_figures, old_figures = headline(kind, new.figures), None if old is None else headline(kind, old.figures)
    limits = (rule.min_gain, rule.max_regression)
    return decide(kind, challenger, new_figures, champion, old_figures, *limits, force=force, gain=gain)
