"""The MS pool as the pairing steps see it: candidate tiles per (teacher) scene class."""

from __future__ import annotations

import numpy as np

from ms2rgb.tasks.data.classes import SCENE_NAMES
from ms2rgb.tasks.errors import EmptyPoolError


def candidates_by_class(ms_classes: np.ndarray, needed: np.ndarray, where: str) -> dict[int, np.ndarray]:
    """Pool rows per class in `needed`; raise EmptyPoolError for a needed class that has none."""
    pools = {int(c): np.flatnonzero(ms_classes == c) for c in np.unique(needed)}
    empty = [SCENE_NAMES[c] for c, rows in pools.items() if len(rows) == 0]
    if empty:
        raise EmptyPoolError(
            where,
            f"no MS tile has teacher class {empty}, so RGB tiles of that class cannot be paired",
            "add MS tiles of those classes to the pool (raise "
            "synth.per_class.ms_pool or `ms2rgb data ingest` a scene that covers them)",
        )
    return pools
