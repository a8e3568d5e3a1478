"""matcher stage (docs/methods.md §A.2): RGB and MS towers in one embedding space, trained on true pairs.

Each training group holds one true pair (same location, from pair_train) and `n_neg` MS tiles of
*other* scene classes drawn from the same batch; the loss is InfoNCE over the group. Evaluation:
retrieval of the true MS partner of held-out pairs (pair_test). With `matcher.ms_tower: teacher` the
MS tower is the frozen teacher's encoder (pooled features), so only the RGB tower learns to land in
the teacher's space; the stage then also reads artifacts/teacher. The stage reads only the paired
splits (pair_train, pair_test), so a scene ingested into ms_pool leaves it fresh; how often a
match within the pool has the right class is the pairs stage's `same_class_rate_true`.
Outputs: artifacts/matcher/model.pt, artifacts/matcher/checkpoints/, reports/matcher.json;
registered in MLflow as `<tracking.model_prefix>-matcher` (as a PairScorer: one stacked RGB+MS tensor in, score out).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ms2rgb.models.classifier import SceneCNN
from ms2rgb.models.matcher import CrossModalMatcher, PairScorer, build_groups, group_contrastive_loss
from ms2rgb.tasks.config import MatcherStageConfig, Params, model_name
from ms2rgb.tasks.data.artifacts import MODEL_FILE, model_path, staging_dir
from ms2rgb.tasks.data.geotiff import sha256_of
from ms2rgb.tasks.data.pairing import PairSet, load_true_pairs
from ms2rgb.tasks.data.validated import require_validated
from ms2rgb.tasks.tracking import StageTracker
from ms2rgb.tasks.training.augment import random_dihedral
from ms2rgb.tasks.training.inference import retrieval
from ms2rgb.tasks.training.loop import (
    EpochStats,
    FitConfig,
    Trainer,
    fingerprint,
    pick_device,
    seed_everything,
    to_tensor,
)
from ms2rgb.tasks.training.progress import epoch_printer, log_curves
from ms2rgb.tasks.training.store import load_model, save_model

READS = {"pair_train": ("ms", "rgb"), "pair_test": ("ms", "rgb")}  # split -> modalities (dvc.yaml deps)


def contrastive_step(matcher: CrossModalMatcher, pairs: PairSet, cfg: MatcherStageConfig, generator: torch.Generator):
    """The Trainer step: group InfoNCE on a batch; a hit is a pair scored above all its negatives."""
    device = next(matcher.parameters()).device
    labels = torch.as_tensor(np.array(pairs.labels))  # a copy: cached labels are read-only

    def step(idx: np.ndarray) -> tuple[torch.Tensor, int, int]:
        rgb, ms = to_tensor(pairs.rgb, idx), to_tensor(pairs.ms, idx)
        if cfg.augment:
            rgb, ms = random_dihedral((rgb, ms), generator)
        r, e = matcher.embed_rgb(rgb.to(device)), matcher.embed_ms(ms.to(device))  # (B, D) each
        neg = build_groups(labels[idx], labels[idx], cfg.n_neg, generator).to(device)  # (B, K)
        loss = group_contrastive_loss(r, e, e[neg], cfg.temperature)
        pos = (r * e).sum(-1)  # (B,)
        hardest = torch.einsum("bd,bkd->bk", r, e[neg]).amax(1)  # (B,)
        return loss, int((pos > hardest).sum()), len(idx)

    return step


def train(
    pairs: PairSet,
    cfg: MatcherStageConfig,
    seed: int,
    teacher: SceneCNN | None = None,
    checkpoint_dir: Path | None = None,
    on_epoch: Callable[[Trainer, EpochStats], None] | None = None,
    fingerprint: str = "",
) -> tuple[CrossModalMatcher, Trainer]:
    """Fit a matcher on true pairs (its MS tower the frozen `teacher` when ms_tower=teacher);
    `on_epoch(trainer, stats)` after every epoch."""
    seed_everything(seed)
    arch = cfg.model(teacher.cfg if teacher is not None else None)
    matcher = CrossModalMatcher(arch, teacher if arch.teacher is not None else None).to(pick_device())
    trainer = Trainer(
        matcher,
        len(pairs.labels),
        FitConfig(cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay),
        seed,
        checkpoint_dir=checkpoint_dir,
        min_batch=cfg.batch_size // 2,
        fingerprint=fingerprint,
    )
    draws = torch.Generator().manual_seed(seed + 1)  # augmentation and negatives
    saved = trainer.resume()
    if "draws_rng" in saved:
        draws.set_state(saved["draws_rng"])
    step = contrastive_step(matcher, pairs, cfg, draws)
    for _ in trainer.remaining:
        stats = trainer.run_epoch(step)
        trainer.save_checkpoint({"draws_rng": draws.get_state()})
        if on_epoch:
            on_epoch(trainer, stats)
    return matcher.eval(), trainer


def run(root: Path, params: Params, tracker: StageTracker) -> dict[str, Any]:
    """Stage entry point (DVC and Prefect call this alike)."""
    start = time.perf_counter()
    cfg, seed = params.matcher, params.seed
    prepared = root / params.data.prepared_dir
    data_digest = require_validated(root, prepared, READS)
    train_pairs, test_pairs = load_true_pairs(prepared, "pair_train"), load_true_pairs(prepared, "pair_test")
    tracker.log_params({"matcher": cfg.model_dump(), "seed": seed})
    out = staging_dir(root, "matcher")  # swapped in whole by the stage runner after success
    teacher = None
    upstream = ""
    if cfg.ms_tower == "teacher":
        teacher = load_model(model_path(root, "teacher"), "scene_cnn", "teacher")
        upstream = sha256_of(model_path(root, "teacher"))
    run_id = fingerprint(cfg.model_dump(), seed, data_digest, upstream)
    matcher, trainer = train(train_pairs, cfg, seed, teacher, out / "checkpoints", epoch_printer("matcher"), run_id)
    metrics = {**retrieval(matcher, test_pairs), "train_pair_top1": retrieval(matcher, train_pairs)["pair_top1"]}
    print("matcher: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if v is not None), flush=True)
    save_model(out / MODEL_FILE, "matcher", matcher, matcher.cfg)
    log_curves(tracker, trainer.history, "matcher (group InfoNCE)", "matcher/training_curves.png")
    example = torch.cat([to_tensor(test_pairs.rgb, np.arange(2)), to_tensor(test_pairs.ms, np.arange(2))], 1)
    # Pickled (not exported): `evaluate` re-scores a champion's retrieval through its towers.
    registered = model_name(params.tracking.model_prefix, "matcher")
    version = tracker.log_torch_model(PairScorer(matcher), example.numpy(), registered, serialization_format="pickle")
    return {
        **metrics,
        "train_pairs": len(train_pairs.labels),
        "test_pairs": len(test_pairs.labels),
        "train_loss": trainer.history[-1].loss,
        "epochs": cfg.epochs,
        "model_version": int(version or 0),
        "seconds": round(time.perf_counter() - start, 2),
    }
