"""The challenger's gain over the champion on the same held-out tiles, with a paired bootstrap interval.

Both models are scored on the same tiles, so each resample draws tiles with replacement and applies
the same draw to both: what the two share (hard tiles, easy tiles) cancels, and only their
difference varies. Per-tile outcomes come in two shapes:

- (N,) per-tile scores, e.g. 1 = tile classified right (accuracy) or partner ranked first
  (`pair_top1`): the statistic is their mean, and the gain the mean per-tile difference;
- (N, K, K) per-tile confusion matrices (rows truth, columns prediction) of a segmentation: the
  statistic is the mIoU of their sum, exactly as the headline mIoU is computed from the whole set.

The percentile interval is seeded, so the same outcomes, samples and seed give the same interval
and the same promotion decision on every rerun.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ms2rgb.tasks.training.metrics import BOOTSTRAP_CHUNK, miou_of_sums, percentile_interval

LEVEL = 0.95  # the interval promotion reads


@dataclass(frozen=True)
class Gain:
    """Challenger minus champion on one headline metric, with its paired bootstrap interval."""

    metric: str  # the headline metric, e.g. "accuracy", "pair_top1", "miou"
    mean: float  # the point difference on the tiles as they are
    low: float  # lower end of the 95 % interval
    high: float  # upper end of the 95 % interval
    tiles: int  # held-out tiles both models were scored on

    def describe(self) -> str:
        return (
            f"paired {metric_name(self.metric)} difference {self.mean:+.4f}, 95 % interval "
            f"[{self.low:+.4f}, {self.high:+.4f}] over {self.tiles} shared test tiles"
        )


def metric_name(metric: str) -> str:
    return {"miou": "mIoU"}.get(metric, metric)


def _statistic(outcomes: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The metric of each weighted resample: `weights` (R, N) counts of each tile -> (R,)."""
    if outcomes.ndim == 1:  # (N,) per-tile scores: their mean
        return weights @ outcomes / outcomes.shape[0]
    n, k, _ = outcomes.shape  # (N, K, K) per-tile confusions: mIoU of their sum
    return miou_of_sums((weights @ outcomes.reshape(n, k * k)).reshape(-1, k, k))


def _resamples(rng: np.random.Generator, samples: int, tiles: int) -> Iterator[np.ndarray]:
    """(rows, tiles) float draw counts of each tile, `samples` rows in all, in memory-bounded chunks."""
    chunk = max(1, BOOTSTRAP_CHUNK // tiles)
    for start in range(0, samples, chunk):
        rows = min(chunk, samples - start)
        drawn = rng.integers(0, tiles, (rows, tiles)) + tiles * np.arange(rows)[:, None]  # row r offset by r*N
        yield np.bincount(drawn.ravel(), minlength=rows * tiles).reshape(rows, tiles).astype(np.float64)


def paired_gain(metric: str, new: np.ndarray, old: np.ndarray, samples: int, seed: int) -> Gain:
    """The challenger's (`new`) gain over the champion (`old`) in `metric`, per-tile outcomes of the same tiles."""
    new, old = np.asarray(new, dtype=np.float64), np.asarray(old, dtype=np.float64)
    if new.ndim not in (1, 3) or new.shape[0] != old.shape[0] or new.shape[0] == 0 or new.ndim != old.ndim:
        raise ValueError(
            f"{metric}: the two models' per-tile outcomes must be (N,) scores or (N, K, K) confusions of the "
            f"same N > 0 tiles, got {new.shape} and {old.shape}"
        )
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    tiles = new.shape[0]
    ones = np.ones((1, tiles))
    mean = float(_statistic(new, ones)[0] - _statistic(old, ones)[0])
    rng = np.random.default_rng(seed)
    gains = np.concatenate([_statistic(new, w) - _statistic(old, w) for w in _resamples(rng, samples, tiles)])
    low, high = percentile_interval(gains, LEVEL)
    return Gain(metric, mean, low, high, tiles)
