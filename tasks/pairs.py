"""pairs stage (docs/methods.md §A.3): give every RGB training tile an MS pool partner, with and without its label.

Without the label (what an unlabelled RGB tile gets): the matcher scores the tile against the whole
pool, and a balanced assignment (Sinkhorn with uniform marginals, `models/assignment.py`) picks the
partner, so no MS tile absorbs most matches; the plan's mass per teacher class is the matcher's class
posterior, and the pair's confidence is that posterior at the partner's teacher class times the
teacher's confidence in it. With the label (a labelled tile): the best-scoring MS tile whose teacher
class is that label. MS classes are the teacher's, so unlabelled pool tiles (ingested scenes) take
part through their pseudo-label. The labels of rgb_train are read for the second column and to
report how often the label-free partner has the right class (the pseudo-label accuracy); the student
hides them from training for the unlabelled tiles. Outputs: artifacts/pairs/pairs.parquet,
reports/pairs.json. The table's schema and reader live in tasks/data/pairing.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ms2rgb.models.assignment import class_posterior, sinkhorn_plan
from ms2rgb.models.bands import RGB_BANDS, S2_BANDS
from ms2rgb.models.matcher import CrossModalMatcher
from ms2rgb.tasks.config import PairsConfig, Params
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
from ms2rgb.tasks.training.parallel import run_all
from ms2rgb.tasks.training.store import load_model

READS = {"rgb_train": ("rgb",), "ms_pool": ("ms",)}  # split -> modalities; dvc.yaml lists exactly their files


def match_within_class(
    scores: torch.Tensor, rgb_labels: np.ndarray, ms_classes: np.ndarray, where: str = "ms_pool"
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """For each RGB row, the MS column of its class with the highest score: (ms_index, score, the
    classes with no pool tile, whose rows took the best column of the whole pool instead)."""
    best, best_score = np.empty(len(rgb_labels), dtype=np.int64), np.empty(len(rgb_labels), dtype=np.float32)
    candidates = candidates_by_class(ms_classes, rgb_labels, where)
    for c, cols in candidates.rows.items():
        rows = np.flatnonzero(rgb_labels == c)
        block = scores[rows][:, cols]  # (n_rgb_c, n_ms_c)
        score, pick = block.max(dim=1)
        best[rows], best_score[rows] = cols[pick.numpy()], score.numpy()
    return best, best_score, candidates.fallback


@dataclass
class Assignment:
    """The label-free pairing of every RGB tile."""

    partner: np.ndarray  # (N,) pool row
    score: np.ndarray  # (N,) matcher score of the pair
    confidence: np.ndarray  # (N,) class posterior at the partner's class x teacher confidence


def assign_without_labels(scores: torch.Tensor, teacher: torch.Tensor, cfg: PairsConfig) -> Assignment:
    """Balanced matcher assignment over the whole pool; `teacher` (M, n_classes) the pool's teacher probs."""
    plan = sinkhorn_plan(scores / cfg.temperature, cfg.sinkhorn_iters)  # (N, M), rows sum to 1
    partner = plan.argmax(1)
    ms_class = teacher.argmax(1)
    posterior = class_posterior(plan, ms_class, teacher.shape[1])  # (N, n_classes)
    chosen = ms_class[partner]
    confidence = posterior.gather(1, chosen.view(-1, 1)).squeeze(1) * teacher.max(1).values[partner]
    return Assignment(
        partner.numpy(),
        scores.gather(1, partner.view(-1, 1)).squeeze(1).numpy(),
        confidence.numpy().astype(np.float32),
    )


def pairs_frame(
    rgb: CachedSplit, pool: CachedSplit, free: Assignment, same_class: np.ndarray, probs: torch.Tensor
) -> pd.DataFrame:
    """The pairs table, one row per RGB training tile."""
    best = free.partner
    true = [SCENE_NAMES[c] if c >= 0 else None for c in pool.labels[best]]
    return pd.DataFrame(
        {
            "rgb_id": rgb.ids,
            "ms_id": [pool.ids[i] for i in best],
            "score": free.score.astype(np.float64),
            "confidence": free.confidence.astype(np.float64),
            "match_class": [SCENE_NAMES[c] for c in probs[best].argmax(1).numpy()],
            "ms_id_same_class": [pool.ids[i] for i in same_class],
            "class": [SCENE_NAMES[c] for c in rgb.labels],
            "teacher_probs": list(probs[best].numpy().astype(np.float64)),
            "ms_true_class": pd.Series(true, dtype="string"),
        }
    )


def _agreement(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float | None:
    """Share of rows in `where` with a == b; None when no row qualifies (e.g. an unlabelled pool)."""
    return float((a[where] == b[where]).mean()) if where.any() else None


def pairing_report(frame: pd.DataFrame, free: Assignment, rgb: CachedSplit, pool: CachedSplit, ms_class: np.ndarray):
    """How good the label-free pairing is, scored with the labels it did not use."""
    best, labelled = free.partner, pool.labels >= 0
    right = ms_class[best] == rgb.labels
    confident = free.confidence >= np.median(free.confidence)
    return {
        "pairs": len(frame),
        "distinct_ms_tiles": int(frame["ms_id"].nunique()),
        "distinct_ms_tiles_same_class": int(frame["ms_id_same_class"].nunique()),
        "largest_share_of_one_ms_tile": float(frame["ms_id"].value_counts().iloc[0] / len(frame)),
        "pool_tiles": len(pool.ids),
        "pseudo_labelled_tiles": int((~labelled).sum()),
        "same_class_rate": float(right.mean()),  # = pseudo-label accuracy of the label-free pairs
        "same_class_rate_confident_half": float(right[confident].mean()),
        "mean_confidence": float(free.confidence.mean()),
        "mean_score": float(free.score.mean()),
        "same_class_rate_true": _agreement(pool.labels[best], rgb.labels, pool.labels[best] >= 0),
        "pool_teacher_accuracy": _agreement(ms_class, pool.labels, labelled),
    }


def pool_chunks(n_tiles: int, cfg: PairsConfig) -> list[tuple[int, int]]:
    """(begin, end) of the pool slices that are pseudo-labelled as separate calls: `chunk_tiles` each,
    rounded up to whole inference batches, so every batch holds the tiles it holds in one pass."""
    size = -(-cfg.chunk_tiles // cfg.batch_size) * cfg.batch_size
    return [(begin, min(begin + size, n_tiles)) for begin in range(0, n_tiles, size)]


def chunk_pseudo_labels(root: Path, params: Params, begin: int, end: int) -> torch.Tensor:
    """The teacher's class distribution (T = 1) of pool tiles [begin, end). It reads the teacher and
    the memory-mapped pool itself, so params' `compute` runner may run it in another process."""
    teacher = load_model(model_path(root, "teacher"), "scene_cnn", "teacher")
    pool = open_split(root / params.data.prepared_dir, "ms_pool", "ms")
    return teacher_probs(teacher, pool.images[begin:end], params.pairs.batch_size)


def pool_pseudo_labels(root: Path, params: Params, n_tiles: int) -> torch.Tensor:
    """(n_tiles, classes) teacher distributions of the whole pool, slice by slice on params' `compute`
    runner (one slice in this process by default; the same numbers for any number of workers)."""
    bounds = pool_chunks(n_tiles, params.pairs)
    calls = [{"root": root, "params": params, "begin": begin, "end": end} for begin, end in bounds]
    names = [f"pool[{begin}:{end}]" for begin, end in bounds]
    if len(bounds) > 1:
        print(f"pairs: pseudo-labelling {n_tiles} pool tiles in {len(bounds)} slices", flush=True)
    return torch.cat(run_all(chunk_pseudo_labels, calls, names, params.compute))


def run(root: Path, params: Params, tracker: StageTracker) -> dict[str, Any]:
    """Stage entry point (DVC and Prefect call this alike)."""
    start = time.perf_counter()
    cfg = params.pairs
    prepared = root / params.data.prepared_dir
    require_validated(root, prepared, READS)
    matcher: CrossModalMatcher = load_model(model_path(root, "matcher"), "matcher", "matcher")
    rgb = require_bands(open_split(prepared, "rgb_train", "rgb"), RGB_BANDS, "rgb_train/rgb")
    pool = require_bands(open_split(prepared, "ms_pool", "ms"), S2_BANDS, "ms_pool/ms")
    if (rgb.labels < 0).any():
        raise DataError(
            "rgb_train",
            f"{int((rgb.labels < 0).sum())} RGB training tile(s) have no class",
            "the student set must be labelled; re-run prepare",
        )
    tracker.log_params({"pairs": cfg.model_dump(), "cell_threads": params.compute.cell_threads})
    probs = pool_pseudo_labels(root, params, len(pool.labels))
    ms_class = probs.argmax(1).numpy()
    matcher.to(pick_device())
    scores = matcher.score(embed(matcher, rgb.images, "rgb"), embed(matcher, pool.images, "ms"))  # (N, M)
    free = assign_without_labels(scores, probs, cfg)
    same_class, _, fallback = match_within_class(scores, rgb.labels, ms_class)
    if fallback:
        print(
            f"pairs: warning: the teacher gives no pool tile the class(es) {list(fallback)}; their RGB tiles' "
            "same-class partners come from the matcher over the whole pool (add MS tiles of those classes)",
            flush=True,
        )
    frame = pairs_frame(rgb, pool, free, same_class, probs)
    path = write_pairs(frame, staging_dir(root, "pairs") / PAIRS_FILE)
    tracker.log_artifact(path, "pairs")
    per_class = (
        frame.assign(right=frame["match_class"] == frame["class"])
        .groupby("class")
        .agg(pairs=("rgb_id", "size"), ms_tiles=("ms_id", "nunique"), same_class_rate=("right", "mean"))
        .reset_index()
    )
    tracker.log_table(per_class, "pairs_per_class")
    report = pairing_report(frame, free, rgb, pool, ms_class) | {
        "classes_without_pool_tiles": list(fallback),
        "pairs_by_fallback": int(frame["class"].isin(fallback).sum()),
        "seconds": round(time.perf_counter() - start, 2),
    }
    print(
        f"pairs: {report['pairs']} RGB tiles paired without labels over {report['distinct_ms_tiles']} MS tiles "
        f"(largest share {report['largest_share_of_one_ms_tile']:.3f}); "
        f"same-class rate {report['same_class_rate']:.3f}, "
        f"{report['same_class_rate_confident_half']:.3f} on the confident half",
        flush=True,
    )
    return report
