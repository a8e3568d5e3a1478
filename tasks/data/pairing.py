"""Pair tables: the pairs table the pairs stage writes, and the true RGB/MS pairs of paired splits.

Both are read by more than one stage (pairs, student; matcher, student), so they live here,
below the stages. The pairs table's schema and its reader sit together so that a stale or
foreign table fails loudly where it is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ms2rgb.models.bands import RGB_BANDS, S2_BANDS
from ms2rgb.tasks.data.atomic import write_atomic
from ms2rgb.tasks.data.cache import open_split, require_bands
from ms2rgb.tasks.errors import DataError, PairsTableError

PAIRS_FILE = "pairs.parquet"
# Column -> what it holds. `teacher_probs` is a list of len(SCENE_NAMES) floats in SCENE_NAMES order.
PAIRS_SCHEMA: dict[str, str] = {
    "rgb_id": "id of the RGB training tile (rgb_train)",
    "ms_id": "MS pool partner chosen without the RGB label: the balanced matcher assignment over the whole pool",
    "score": "matcher cosine score of (rgb_id, ms_id)",
    "confidence": "matcher class posterior of ms_id's teacher class x the teacher's confidence in it",
    "match_class": "teacher class of ms_id: the pseudo-label an unlabelled RGB tile learns from",
    "ms_id_same_class": "best-scoring MS tile whose teacher class is the RGB tile's label (for labelled tiles)",
    "class": "the RGB tile's label (hidden from training for unlabelled tiles; kept to report pseudo-label accuracy)",
    "teacher_probs": "teacher class distribution of ms_id",
    "ms_true_class": "ms_id's own label where it has one (null for ingested scenes)",
}


@dataclass(frozen=True)
class Pairing:
    """Each RGB tile's partners as rows of the MS pool, in the order of the RGB ids asked for."""

    free: np.ndarray  # (N,) partner found without the label (ms_id)
    same_class: np.ndarray  # (N,) partner of the tile's own class (ms_id_same_class)
    confidence: np.ndarray  # (N,) float32 confidence of the free partner


def read_pairs(path: Path, rgb_ids: list[str], ms_ids: list[str]) -> Pairing:
    """The pairs table aligned to `rgb_ids` and `ms_ids`; raises on a stale or broken table."""
    fix = "re-run the pairs stage (`ms2rgb stage pairs` or `dvc repro pairs`) after prepare/teacher/matcher"
    if not path.exists():
        raise PairsTableError(path, "the pairs table is missing", fix)
    table = pd.read_parquet(path)
    missing_cols = sorted(set(PAIRS_SCHEMA) - set(table.columns))
    if missing_cols:
        raise PairsTableError(path, f"columns {missing_cols} are missing", fix)
    ms_row = {ms_id: i for i, ms_id in enumerate(ms_ids)}
    for column, known in (("rgb_id", set(rgb_ids)), ("ms_id", ms_row), ("ms_id_same_class", ms_row)):
        unknown = sorted(set(table[column]) - set(known))
        if unknown:
            raise PairsTableError(
                path, f"{len(unknown)} {column}(s) are not in the prepared data, e.g. {unknown[:5]}", fix
            )
    table = table.set_index("rgb_id")
    unpaired = [i for i in rgb_ids if i not in table.index]
    if unpaired:
        raise PairsTableError(path, f"{len(unpaired)} RGB training tile(s) have no pair, e.g. {unpaired[:5]}", fix)
    rows = table.loc[rgb_ids]
    return Pairing(
        np.array([ms_row[i] for i in rows["ms_id"]], dtype=np.int64),
        np.array([ms_row[i] for i in rows["ms_id_same_class"]], dtype=np.int64),
        rows["confidence"].to_numpy(dtype=np.float32),
    )


def write_pairs(frame: pd.DataFrame, path: Path) -> Path:
    """Write the pairs table whole or not at all (it is a DVC output)."""
    return write_atomic(path, lambda tmp: frame.to_parquet(tmp, index=False))


@dataclass
class PairSet:
    """True RGB/MS pairs aligned row by row (same location), with their scene class."""

    rgb: np.ndarray  # (N, 3, H, W) uint8
    ms: np.ndarray  # (N, 13, H, W) uint16
    labels: np.ndarray  # (N,) int64


def load_true_pairs(prepared: Path, split: str) -> PairSet:
    """Both modalities of a paired split, joined on location_id; every location needs both tiles."""
    rgb = require_bands(open_split(prepared, split, "rgb"), RGB_BANDS, f"{split}/rgb")
    ms = require_bands(open_split(prepared, split, "ms"), S2_BANDS, f"{split}/ms")
    ms_row = {loc: i for i, loc in enumerate(ms.location_ids)}
    missing = [loc for loc in rgb.location_ids if loc not in ms_row]
    if missing or len(ms_row) != len(rgb.location_ids):
        raise DataError(
            f"split {split!r}",
            f"locations without both an RGB and an MS tile: {missing[:10]}",
            "a paired split needs one tile of each modality per location; re-run prepare",
        )
    order = np.array([ms_row[loc] for loc in rgb.location_ids])
    return PairSet(np.asarray(rgb.images), np.asarray(ms.images)[order], rgb.labels)
