"""pairs stage (METHODS.md A.2-3): pair every RGB training tile with a same-class MS pool tile.

Same class means the RGB tile's true label and the MS tile's *teacher* class, so unlabelled pool
tiles (ingested scenes) take part through their teacher pseudo-label. Among the candidates of its
class, each RGB tile takes the MS tile with the best matcher score. The table also carries the
teacher's class distribution of the MS tile, which the student uses as its pseudo-label.
Outputs: artifacts/pairs/pairs.parquet, reports/pairs.json. This module also owns the table's
schema and its reader, so the student stage fails loudly on a stale or foreign table.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from models.bands import RGB_BANDS, S2_BANDS
from models.classifier import SceneCNN
from models.matcher import CrossModalMatcher
from tasks.cache import CachedSplit, open_split, require_bands
from tasks.classes import SCENE_NAMES
from tasks.config import require_range, section
from tasks.errors import DataError, PairsTableError
from tasks.matcher import ARTIFACTS as MATCHER_ARTIFACTS
from tasks.matcher import embed
from tasks.model_store import MODEL_FILE, load_model
from tasks.pool import candidates_by_class
from tasks.teacher import ARTIFACTS as TEACHER_ARTIFACTS
from tasks.tracking import StageTracker
from tasks.training import pick_device, predict

ARTIFACTS = Path("artifacts") / "pairs"
PAIRS_FILE = "pairs.parquet"
# Column -> what it holds. `teacher_probs` is a list of len(SCENE_NAMES) floats in SCENE_NAMES order.
PAIRS_SCHEMA: dict[str, str] = {
    "rgb_id": "id of the RGB training tile (rgb_train)",
    "ms_id": "id of the paired MS pool tile (ms_pool)",
    "score": "matcher cosine score of the pair",
    "class": "scene class: the RGB tile's label and the MS tile's teacher class",
    "teacher_probs": "teacher class distribution of the MS tile",
    "ms_true_class": "the MS tile's own label where it has one (null for ingested scenes)",
}


@dataclass(frozen=True)
class PairsConfig:
    batch_size: int = 256  # tiles per inference batch (teacher and matcher)

    def check(self, name: str) -> None:
        require_range(f"{name}.batch_size", self.batch_size, 1, 65536)


def teacher_probs(teacher: SceneCNN, images: np.ndarray, batch_size: int) -> torch.Tensor:
    """(N, n_classes) teacher class distribution of every MS tile (T = 1)."""
    device = pick_device()
    return predict(teacher.to(device).eval(), images, device, batch_size).softmax(dim=1)


def match_within_class(scores: torch.Tensor, rgb_labels: np.ndarray, ms_classes: np.ndarray,
                       where: str = "ms_pool") -> tuple[np.ndarray, np.ndarray]:
    """For each RGB row, the MS column of its class with the highest score: (ms_index, score)."""
    best, best_score = np.empty(len(rgb_labels), dtype=np.int64), np.empty(len(rgb_labels), dtype=np.float32)
    for c, cols in candidates_by_class(ms_classes, rgb_labels, where).items():
        rows = np.flatnonzero(rgb_labels == c)
        block = scores[rows][:, cols]  # (n_rgb_c, n_ms_c)
        score, pick = block.max(dim=1)
        best[rows], best_score[rows] = cols[pick.numpy()], score.numpy()
    return best, best_score


def pairs_frame(rgb: CachedSplit, pool: CachedSplit, best: np.ndarray, score: np.ndarray,
                probs: torch.Tensor) -> pd.DataFrame:
    """The pairs table, one row per RGB training tile."""
    true = [SCENE_NAMES[c] if c >= 0 else None for c in pool.labels[best]]
    return pd.DataFrame({
        "rgb_id": rgb.ids, "ms_id": [pool.ids[i] for i in best], "score": score.astype(np.float64),
        "class": [SCENE_NAMES[c] for c in rgb.labels], "teacher_probs": list(probs[best].numpy().astype(np.float64)),
        "ms_true_class": pd.Series(true, dtype="string")})


def read_pairs(path: Path, rgb_ids: list[str], ms_ids: list[str]) -> np.ndarray:
    """Row in `ms_ids` of each RGB tile's partner, in `rgb_ids` order; raises on a stale or broken table."""
    fix = "re-run the pairs stage (`ms2rgb stage pairs` or `dvc repro pairs`) after prepare/teacher/matcher"
    if not path.exists():
        raise PairsTableError(path, "the pairs table is missing", fix)
    table = pd.read_parquet(path)
    missing_cols = sorted(set(PAIRS_SCHEMA) - set(table.columns))
    if missing_cols:
        raise PairsTableError(path, f"columns {missing_cols} are missing", fix)
    ms_row = {ms_id: i for i, ms_id in enumerate(ms_ids)}
    for column, known in (("rgb_id", set(rgb_ids)), ("ms_id", ms_row)):
        unknown = sorted(set(table[column]) - set(known))
        if unknown:
            raise PairsTableError(path, f"{len(unknown)} {column}(s) are not in the prepared data, "
                                  f"e.g. {unknown[:5]}", fix)
    partner = dict(zip(table["rgb_id"], table["ms_id"]))
    unpaired = [i for i in rgb_ids if i not in partner]
    if unpaired:
        raise PairsTableError(path, f"{len(unpaired)} RGB training tile(s) have no pair, e.g. {unpaired[:5]}", fix)
    return np.array([ms_row[partner[i]] for i in rgb_ids], dtype=np.int64)


def _agreement(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float | None:
    """Share of rows in `where` with a == b; None when no row qualifies (e.g. an unlabelled pool)."""
    return float((a[where] == b[where]).mean()) if where.any() else None


def _write_atomic(frame: pd.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    frame.to_parquet(tmp, index=False)
    tmp.replace(path)
    return path


def run(root: Path, params: dict[str, Any], tracker: StageTracker) -> dict[str, Any]:
    """Stage entry point (DVC and Prefect call this alike)."""
    start = time.perf_counter()
    cfg = section(params, "pairs", PairsConfig)
    prepared = root / params["data"]["prepared_dir"]
    teacher = load_model(root / TEACHER_ARTIFACTS / MODEL_FILE, "scene_cnn", "teacher")
    matcher: CrossModalMatcher = load_model(root / MATCHER_ARTIFACTS / MODEL_FILE, "matcher", "matcher")
    rgb = require_bands(open_split(prepared, "rgb_train", "rgb"), RGB_BANDS, "rgb_train/rgb")
    pool = require_bands(open_split(prepared, "ms_pool", "ms"), S2_BANDS, "ms_pool/ms")
    if (rgb.labels < 0).any():
        raise DataError("rgb_train", f"{int((rgb.labels < 0).sum())} RGB training tile(s) have no class",
                        "the student set must be labelled; re-run prepare")
    tracker.log_params({"pairs": {"batch_size": cfg.batch_size}})
    probs = teacher_probs(teacher, pool.images, cfg.batch_size)
    ms_class = probs.argmax(1).numpy()
    matcher.to(pick_device())
    scores = matcher.score(embed(matcher, rgb.images, "rgb"), embed(matcher, pool.images, "ms"))  # (N, M)
    best, score = match_within_class(scores, rgb.labels, ms_class)
    frame = pairs_frame(rgb, pool, best, score, probs)
    path = _write_atomic(frame, root / ARTIFACTS / PAIRS_FILE)
    tracker.log_artifact(path, "pairs")
    known, labelled = pool.labels[best] >= 0, pool.labels >= 0
    per_class = frame.groupby("class").agg(pairs=("rgb_id", "size"), ms_tiles=("ms_id", "nunique"),
                                           mean_score=("score", "mean")).reset_index()
    tracker.log_table(per_class, "pairs_per_class")
    report = {
        "pairs": len(frame), "distinct_ms_tiles": int(frame["ms_id"].nunique()), "pool_tiles": len(pool.ids),
        "pseudo_labelled_tiles": int((~labelled).sum()), "mean_score": float(score.mean()),
        "same_class_rate_true": _agreement(pool.labels[best], rgb.labels, known),
        "pool_teacher_accuracy": _agreement(ms_class, pool.labels, labelled),
        "seconds": round(time.perf_counter() - start, 2)}
    print(f"pairs: {report['pairs']} pairs over {report['distinct_ms_tiles']} MS tiles, "
          f"true same-class rate {report['same_class_rate_true']}", flush=True)
    return report
