"""The MS pool as the pairing steps see it: candidate tiles per (teacher) scene class."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ms2rgb.tasks.data.classes import SCENE_NAMES
from ms2rgb.tasks.errors import EmptyPoolError


@dataclass(frozen=True)
class Candidates:
    """Pool rows per needed class; a class the teacher gives no pool tile gets the whole pool."""

    rows: dict[int, np.ndarray]  # class index -> pool rows to choose from
    fallback: tuple[str, ...]  # names of the classes that got the whole pool


def candidates_by_class(ms_classes: np.ndarray, needed: np.ndarray, where: str) -> Candidates:
    """Pool rows per class in `needed`. Why a fallback rather than an error: on small real pools the
    teacher may predict no tile of some class (a 9-location EuroSAT pool has no AnnualCrop), and
    the matcher over the whole pool still finds the nearest MS tile. Raises EmptyPoolError only
    when the pool is empty."""
    if len(ms_classes) == 0:
        raise EmptyPoolError(
            where,
            "the MS pool is empty, so no RGB tile can be paired",
            "add MS tiles to the pool (raise synth.per_class.ms_pool or `ms2rgb data ingest` a scene)",
        )
    every = np.arange(len(ms_classes))
    rows = {int(c): np.flatnonzero(ms_classes == c) for c in np.unique(needed)}
    fallback = tuple(SCENE_NAMES[c] for c, found in rows.items() if len(found) == 0)
    return Candidates({c: found if len(found) else every for c, found in rows.items()}, fallback)
