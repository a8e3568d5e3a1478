"""pairs stage (docs/methods.md §A.3): pair every RGB training tile with a same-class MS pool tile.

Same class means the RGB tile's true label and the MS tile's *teacher* class, so unlabelled pool
tiles (ingested scenes) take part through their teacher pseudo-label. Among the candidates of its
class, each RGB tile takes the MS tile with the best matcher score. The table also records the
teacher's class distribution of the MS tile (for inspection; the student re-runs the teacher over
the pool itself). Outputs: artifacts/pairs/pairs.parquet, reports/pairs.json. The table's schema
and reader live in tasks/data/pairing.py, below both this stage and the student.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ms2rgb.models.bands import RGB_BANDS, S2_BANDS
from ms2rgb.models.matcher import CrossModalMatcher
from ms2rgb.tasks.config import Params
from ms2rgb.tasks.data.artifacts import model_path, staging_dir
from ms2rgb.tasks.data.cache import CachedSplit, open_split, require_bands
from ms2rgb.tasks.data.classes import SCENE_NAMES
from ms2rgb.tasks.data.pairing import PAIRS_FILE, write_pairs
from ms2rgb.tasks.data.pool import candidates_by_class
from ms2rgb.tasks.data.validated import require_validated
from ms2rgb.tasks.errors import DataError
from ms2rgb.tasks.tracking import StageTracker
from ms2rgb.tasks.training.inference import embed, teacher_probs
from ms2rgb.tasks.training.loop import pick_device
from ms2rgb.tasks.training.store import load_model

READS = {"rgb_train": ("rgb",), "ms_pool": ("ms",)}  # split -> modalities; dvc.yaml lists exactly their files


def match_within_class(
    scores: torch.Tensor, rgb_labels: np.ndarray, ms_classes: np.ndarray, where: str = "ms_pool"
) -> tuple[np.ndarray, np.ndarray]:
    """For each RGB row, the MS column of its class with the highest score: (ms_index, score)."""
    best, best_score = np.empty(len(rgb_labels), dtype=np.int64), np.empty(len(rgb_labels), dtype=np.float32)
    for c, cols in candidates_by_class(ms_classes, rgb_labels, where).items():
        rows = np.flatnonzero(rgb_labels == c)
        block = scores[rows][:, cols]  # (n_rgb_c, n_ms_c)
        score, pick = block.max(dim=1)
        best[rows], best_score[rows] = cols[pick.numpy()], score.numpy()
    return best, best_score


def pairs_frame(
    rgb: CachedSplit, pool: CachedSplit, best: np.ndarray, score: np.ndarray, probs: torch.Tensor
) -> pd.DataFrame:
    """The pairs table, one row per RGB training tile."""
    true = [SCENE_NAMES[c] if c >= 0 else None for c in pool.labels[best]]
    return pd.DataFrame(
        {
            "rgb_id": rgb.ids,
            "ms_id": [pool.ids[i] for i in best],
            "score": score.astype(np.float64),
            "class": [SCENE_NAMES[c] for c in rgb.labels],
            "teacher_probs": list(probs[best].numpy().astype(np.float64)),
            "ms_true_class": pd.Series(true, dtype="string"),
        }
    )


def _agreement(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float | None:
    """Share of rows in `where` with a == b; None when no row qualifies (e.g. an unlabelled pool)."""
    return float((a[where] == b[where]).mean()) if where.any() else None


def run(root: Path, params: Params, tracker: StageTracker) -> dict[str, Any]:
    """Stage entry point (DVC and Prefect call this alike)."""
    start = time.perf_counter()
    cfg = params.pairs
    prepared = root / params.data.prepared_dir
    require_validated(root, prepared, READS)
    teacher = load_model(model_path(root, "teacher"), "scene_cnn", "teacher")
    matcher: CrossModalMatcher = load_model(model_path(root, "matcher"), "matcher", "matcher")
    rgb = require_bands(open_split(prepared, "rgb_train", "rgb"), RGB_BANDS, "rgb_train/rgb")
    pool = require_bands(open_split(prepared, "ms_pool", "ms"), S2_BANDS, "ms_pool/ms")
    if (rgb.labels < 0).any():
        raise DataError(
            "rgb_train",
            f"{int((rgb.labels < 0).sum())} RGB training tile(s) have no class",
            "the student set must be labelled; re-run prepare",
        )
    tracker.log_params({"pairs": {"batch_size": cfg.batch_size}})
    probs = teacher_probs(teacher, pool.images, cfg.batch_size)
    ms_class = probs.argmax(1).numpy()
    matcher.to(pick_device())
    scores = matcher.score(embed(matcher, rgb.images, "rgb"), embed(matcher, pool.images, "ms"))  # (N, M)
    best, score = match_within_class(scores, rgb.labels, ms_class)
    frame = pairs_frame(rgb, pool, best, score, probs)
    path = write_pairs(frame, staging_dir(root, "pairs") / PAIRS_FILE)
    tracker.log_artifact(path, "pairs")
    known, labelled = pool.labels[best] >= 0, pool.labels >= 0
    per_class = (
        frame.groupby("class")
        .agg(pairs=("rgb_id", "size"), ms_tiles=("ms_id", "nunique"), mean_score=("score", "mean"))
        .reset_index()
    )
    tracker.log_table(per_class, "pairs_per_class")
    report = {
        "pairs": len(frame),
        "distinct_ms_tiles": int(frame["ms_id"].nunique()),
        "pool_tiles": len(pool.ids),
        "pseudo_labelled_tiles": int((~labelled).sum()),
        "mean_score": float(score.mean()),
        "same_class_rate_true": _agreement(pool.labels[best], rgb.labels, known),
        "pool_teacher_accuracy": _agreement(ms_class, pool.labels, labelled),
        "seconds": round(time.perf_counter() - start, 2),
    }
    print(
        f"pairs: {report['pairs']} pairs over {report['distinct_ms_tiles']} MS tiles, "
        f"true same-class rate {report['same_class_rate_true']}",
        flush=True,
    )
    return report
