"""matcher stage (METHODS.md A.2): RGB and MS towers in one embedding space, trained on true pairs.

Each training group holds one true pair (same location, from pair_train) and `n_neg` MS tiles of
*other* scene classes drawn from the same batch; the loss is InfoNCE over the group. Evaluation:
retrieval of the true MS partner of held-out pairs (pair_test) and the share of RGB training
tiles whose best MS pool match has their class.
Outputs: artifacts/matcher/model.pt, artifacts/matcher/checkpoints/, reports/matcher.json;
registered in MLflow as `ms2rgb-matcher` (as a PairScorer: one stacked RGB+MS tensor in, score out).
"""
from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.bands import RGB_BANDS, S2_BANDS
from models.matcher import CrossModalMatcher, MatcherConfig, PairScorer, build_groups, group_contrastive_loss
from tasks.cache import CachedSplit, open_split, require_bands
from tasks.config import require_range, section
from tasks.errors import DataError
from tasks.model_store import MODEL_FILE, save_model
from tasks.progress import epoch_printer, log_curves
from tasks.tracking import StageTracker
from tasks.training import (EpochStats, FitConfig, Trainer, pick_device, predict, random_dihedral, seed_everything,
                            to_tensor)

ARTIFACTS = Path("artifacts") / "matcher"
REGISTERED_NAME = "ms2rgb-matcher"


@dataclass(frozen=True)
class MatcherStageConfig:
    embed_dim: int = 64        # shared embedding size
    width: int = 16            # first-stage channels of each tower
    stem_stride: int = 2       # 2: first conv at half resolution (4x cheaper)
    temperature: float = 0.1   # InfoNCE temperature
    n_neg: int = 8             # negatives per group, each of a different class than the pair
    epochs: int = 40           # passes over pair_train (small: few true pairs exist)
    batch_size: int = 32       # pairs per step; negatives come from the same batch
    lr: float = 3e-3           # AdamW peak learning rate (one-cycle)
    weight_decay: float = 1e-4
    augment: bool = True       # one random flip/rotation per pair, shared by both tiles

    def check(self, name: str) -> None:
        for key, low, high in (("embed_dim", 2, 4096), ("width", 4, 256), ("stem_stride", 1, 2),
                               ("n_neg", 1, 1024), ("epochs", 1, 10000), ("batch_size", 4, 4096)):
            require_range(f"{name}.{key}", getattr(self, key), low, high)
        require_range(f"{name}.temperature", self.temperature, 1e-3, 10.0)
        require_range(f"{name}.lr", self.lr, 1e-6, 1.0)
        require_range(f"{name}.weight_decay", self.weight_decay, 0.0, 1.0)

    def model(self) -> MatcherConfig:
        return MatcherConfig(rgb_bands=RGB_BANDS, ms_bands=S2_BANDS, embed_dim=self.embed_dim, width=self.width,
                             temperature=self.temperature, stem_stride=self.stem_stride)


@dataclass
class PairSet:
    """True RGB/MS pairs aligned row by row (same location), with their scene class."""

    rgb: np.ndarray      # (N, 3, H, W) uint8
    ms: np.ndarray       # (N, 13, H, W) uint16
    labels: np.ndarray   # (N,) int64


def load_pairs(prepared: Path, split: str) -> PairSet:
    """Both modalities of a paired split, joined on location_id; every location needs both tiles."""
    rgb = require_bands(open_split(prepared, split, "rgb"), RGB_BANDS, f"{split}/rgb")
    ms = require_bands(open_split(prepared, split, "ms"), S2_BANDS, f"{split}/ms")
    ms_row = {loc: i for i, loc in enumerate(ms.location_ids)}
    missing = [loc for loc in rgb.location_ids if loc not in ms_row]
    if missing or len(ms_row) != len(rgb.location_ids):
        raise DataError(f"split {split!r}", f"locations without both an RGB and an MS tile: {missing[:10]}",
                        "a paired split needs one tile of each modality per location; re-run prepare")
    order = np.array([ms_row[loc] for loc in rgb.location_ids])
    return PairSet(np.asarray(rgb.images), np.asarray(ms.images)[order], rgb.labels)


def contrastive_step(matcher: CrossModalMatcher, pairs: PairSet, cfg: MatcherStageConfig,
                     generator: torch.Generator):
    """The Trainer step: group InfoNCE on a batch; a hit is a pair scored above all its negatives."""
    device = next(matcher.parameters()).device
    labels = torch.as_tensor(np.array(pairs.labels))  # a copy: cached labels are read-only

    def step(idx: np.ndarray) -> tuple[torch.Tensor, int]:
        rgb, ms = to_tensor(pairs.rgb, idx), to_tensor(pairs.ms, idx)
        if cfg.augment:
            rgb, ms = random_dihedral((rgb, ms), generator)
        r, e = matcher.embed_rgb(rgb.to(device)), matcher.embed_ms(ms.to(device))  # (B, D) each
        neg = build_groups(labels[idx], labels[idx], cfg.n_neg, generator).to(device)  # (B, K)
        loss = group_contrastive_loss(r, e, e[neg], cfg.temperature)
        pos = (r * e).sum(-1)  # (B,)
        hardest = torch.einsum("bd,bkd->bk", r, e[neg]).amax(1)  # (B,)
        return loss, int((pos > hardest).sum())

    return step


def embed(matcher: CrossModalMatcher, images: np.ndarray, modality: str) -> torch.Tensor:
    """(N, D) unit embeddings of every tile through the tower of `modality` (rgb | ms)."""
    device = next(matcher.parameters()).device
    tower = matcher.embed_rgb if modality == "rgb" else matcher.embed_ms
    return predict(tower, images, device)


def retrieval(matcher: CrossModalMatcher, pairs: PairSet) -> dict[str, float]:
    """Rank of each RGB tile's true MS partner among all MS tiles of the set."""
    scores = matcher.score(embed(matcher, pairs.rgb, "rgb"), embed(matcher, pairs.ms, "ms"))  # (N, N)
    true = scores.diagonal().unsqueeze(1)  # (N, 1)
    rank = (scores > true).sum(1)  # (N,) 0 = partner scored best
    best = scores.argmax(1).numpy()
    return {"pair_top1": float((rank < 1).float().mean()), "pair_top5": float((rank < 5).float().mean()),
            "pair_same_class_rate": float((pairs.labels[best] == pairs.labels).mean()),
            "pair_chance_top1": 1.0 / len(pairs.labels)}


def same_class_rate(matcher: CrossModalMatcher, rgb: CachedSplit, pool: CachedSplit) -> float | None:
    """Share of RGB training tiles whose best-scoring labelled MS pool tile has their class."""
    known = pool.labels >= 0
    if not known.any():
        return None  # an all-unlabelled pool (ingested scenes only): nothing to compare with
    scores = matcher.score(embed(matcher, rgb.images, "rgb"), embed(matcher, pool.images[known], "ms"))
    best = scores.argmax(1).numpy()
    return float((pool.labels[known][best] == rgb.labels).mean())


def train(pairs: PairSet, cfg: MatcherStageConfig, seed: int, checkpoint_dir: Path | None = None,
          on_epoch: Callable[[Trainer, EpochStats], None] | None = None) -> tuple[CrossModalMatcher, Trainer]:
    """Fit a matcher on true pairs; `on_epoch(trainer, stats)` after every epoch."""
    seed_everything(seed)
    matcher = CrossModalMatcher(cfg.model()).to(pick_device())
    trainer = Trainer(matcher, len(pairs.labels), FitConfig(cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay),
                      seed, checkpoint_dir=checkpoint_dir, min_batch=cfg.batch_size // 2)
    draws = torch.Generator().manual_seed(seed + 1)  # augmentation and negatives
    step = contrastive_step(matcher, pairs, cfg, draws)
    for _ in range(trainer.epochs):
        stats = trainer.run_epoch(step)
        trainer.save_checkpoint({"draws_rng": draws.get_state()})
        if on_epoch:
            on_epoch(trainer, stats)
    return matcher.eval(), trainer


def run(root: Path, params: dict[str, Any], tracker: StageTracker) -> dict[str, Any]:
    """Stage entry point (DVC and Prefect call this alike)."""
    start = time.perf_counter()
    cfg = section(params, "matcher", MatcherStageConfig)
    seed = int(params.get("seed", 0))
    prepared = root / params["data"]["prepared_dir"]
    train_pairs, test_pairs = load_pairs(prepared, "pair_train"), load_pairs(prepared, "pair_test")
    rgb = require_bands(open_split(prepared, "rgb_train", "rgb"), RGB_BANDS, "rgb_train/rgb")
    pool = require_bands(open_split(prepared, "ms_pool", "ms"), S2_BANDS, "ms_pool/ms")
    tracker.log_params({"matcher": asdict(cfg), "seed": seed})
    out = root / ARTIFACTS
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    matcher, trainer = train(train_pairs, cfg, seed, out / "checkpoints", epoch_printer("matcher"))
    metrics = {**retrieval(matcher, test_pairs), "same_class_rate": same_class_rate(matcher, rgb, pool),
               "train_pair_top1": retrieval(matcher, train_pairs)["pair_top1"]}
    print("matcher: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if v is not None), flush=True)
    save_model(out / MODEL_FILE, "matcher", matcher, matcher.cfg)
    log_curves(tracker, trainer.history, "matcher (group InfoNCE)", "matcher/training_curves.png")
    example = torch.cat([to_tensor(test_pairs.rgb, np.arange(2)), to_tensor(test_pairs.ms, np.arange(2))], 1)
    version = tracker.log_torch_model(PairScorer(matcher), example.numpy(), REGISTERED_NAME)
    return {**metrics, "train_pairs": len(train_pairs.labels), "test_pairs": len(test_pairs.labels),
            "train_loss": trainer.history[-1].loss, "epochs": cfg.epochs, "model_version": int(version or 0),
            "seconds": round(time.perf_counter() - start, 2)}
