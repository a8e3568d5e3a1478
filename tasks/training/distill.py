"""Training one RGB student (docs/methods.md §A.4–§A.7): the full method or one of its baselines/ablations.

A student is trained on RGB tiles, each with a partner row in a bank of frozen teacher outputs
(features and logits of MS tiles). Variants differ only in where partners come from, which loss
terms are on and whether partners are re-matched, so every comparison shares data and budget.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ms2rgb.models.classifier import SceneCNN, SceneCNNConfig
from ms2rgb.models.distill import DistillLoss, rematch
from ms2rgb.tasks.config import StudentConfig
from ms2rgb.tasks.data.pool import candidates_by_class
from ms2rgb.tasks.training.augment import random_dihedral
from ms2rgb.tasks.training.inference import predict
from ms2rgb.tasks.training.loop import (
    EpochStats,
    FitConfig,
    StepFn,
    Trainer,
    batch_bounds,
    pick_device,
    seed_everything,
    to_tensor,
)


@dataclass(frozen=True)
class Variant:
    """One row of the comparison: where partners come from and which parts of the method are on."""

    name: str
    partners: str  # matched (pairs table) | random (same-class pool tile) | true (same location) | none
    feature_loss: bool  # attention + domain-shift term
    kd: bool  # KL to the partner's teacher distribution
    rematch: bool  # iterative re-matching (A.6)


FULL_METHOD = "full_method"
VARIANTS: tuple[Variant, ...] = (
    Variant(FULL_METHOD, "matched", feature_loss=True, kd=True, rematch=True),
    Variant("rgb_only", "none", feature_loss=False, kd=False, rematch=False),
    Variant("kd_random_pairs", "random", feature_loss=False, kd=True, rematch=False),
    Variant("no_feature_loss", "matched", feature_loss=False, kd=True, rematch=True),
    Variant("no_rematch", "matched", feature_loss=True, kd=True, rematch=False),
    Variant("paired_kd", "true", feature_loss=True, kd=True, rematch=False),
)


@dataclass
class TeacherBank:
    """Frozen teacher outputs for the MS tiles a student may be paired with, computed once."""

    feats: torch.Tensor  # (M, C, 8, 8) on the training device
    logits: torch.Tensor  # (M, n_classes) on the training device
    probs: torch.Tensor  # (M, n_classes) on CPU, T = 1: the teacher's classification, for re-matching
    classes: np.ndarray  # (M,) teacher class
    true: np.ndarray  # (M,) the tile's own label, -1 where unknown


@dataclass
class StudentSet:
    """RGB training tiles with their initial partner row in `bank` (None: no teacher at all)."""

    rgb: np.ndarray  # (N, 3, H, W) uint8
    labels: np.ndarray  # (N,) int64
    bank: TeacherBank | None
    partners: np.ndarray | None  # (N,) int64 rows into bank


@dataclass(frozen=True)
class RematchRound:
    epoch: int  # 1-based epoch after which the round ran
    changed: float  # share of RGB tiles whose partner changed
    same_class_rate: float  # share whose new partner's teacher class is the RGB label
    same_true_class_rate: float | None  # same, with the partner's own label where it has one


@dataclass
class StudentRun:
    model: SceneCNN
    history: list[EpochStats]
    terms: list[dict[str, float]] = field(default_factory=list)  # per-epoch mean of feat/kd/ce
    rounds: list[RematchRound] = field(default_factory=list)


@torch.no_grad()
def teacher_bank(teacher: SceneCNN, ms: np.ndarray, true: np.ndarray) -> TeacherBank:
    """Run the frozen teacher once over `ms` tiles."""
    device = pick_device()
    teacher.to(device).eval()
    feats = predict(teacher.encode, ms, device).to(device)  # (M, C, 8, 8)
    logits = teacher.classify(feats).float()
    probs = logits.softmax(1).cpu()
    return TeacherBank(feats, logits, probs, probs.argmax(1).numpy(), np.asarray(true))


def random_partners(labels: np.ndarray, bank: TeacherBank, seed: int) -> np.ndarray:
    """A uniformly drawn MS tile of the same (teacher) class for every RGB tile."""
    rng = np.random.default_rng(seed)
    partners = np.empty(len(labels), dtype=np.int64)
    for c, rows in candidates_by_class(bank.classes, labels, "ms_pool").items():
        where = np.flatnonzero(labels == c)
        partners[where] = rng.choice(rows, size=len(where))
    return partners


def rematch_partners(student: SceneCNN, data: StudentSet, scope: str) -> np.ndarray:
    """A.6: each RGB tile's new partner is the MS tile whose teacher distribution is closest
    (Jensen-Shannon) to the student's. `class` scope keeps the candidates to the tile's class,
    the method's premise (same-class pairs): unrestricted, a misclassified tile would be paired
    with a teacher that confirms the student's mistake."""
    bank = data.bank
    assert bank is not None, "re-matching needs a teacher bank"
    device = next(student.parameters()).device
    probs = predict(student.eval(), data.rgb, device).softmax(1)  # (N, n_classes)
    if scope == "pool":
        return rematch(probs, bank.probs).numpy()
    new = np.empty(len(data.labels), dtype=np.int64)
    for c, cols in candidates_by_class(bank.classes, data.labels, "ms_pool").items():
        rows = np.flatnonzero(data.labels == c)
        new[rows] = cols[rematch(probs[rows], bank.probs[cols]).numpy()]
    return new


def _round(epoch: int, old: np.ndarray, new: np.ndarray, data: StudentSet) -> RematchRound:
    bank = data.bank
    assert bank is not None, "re-matching needs a teacher bank"
    true = bank.true[new]
    known = true >= 0
    return RematchRound(
        epoch,
        float((old != new).mean()),
        float((bank.classes[new] == data.labels).mean()),
        float((true[known] == data.labels[known]).mean()) if known.any() else None,
    )


def distill_step(
    student: SceneCNN,
    loss_fn: DistillLoss,
    data: StudentSet,
    partners: np.ndarray | None,
    augment: torch.Generator | None,
    meter: dict[str, float],
) -> StepFn:
    """The Trainer step; reads `partners` at call time, so re-matching in place takes effect."""
    device = next(student.parameters()).device
    labels = torch.as_tensor(np.array(data.labels))  # a copy: cached labels are read-only

    def step(idx: np.ndarray) -> tuple[torch.Tensor, int]:
        x = to_tensor(data.rgb, idx)
        if augment is not None:
            (x,) = random_dihedral((x,), augment)
        y = labels[idx].to(device)
        feat = student.encode(x.to(device))  # (B, C, 8, 8)
        logits = student.classify(feat)
        t_feat = t_logits = None
        if data.bank is not None:
            assert partners is not None, "a student set with a teacher bank has partners"
            rows = torch.as_tensor(partners[idx], device=device)
            t_feat, t_logits = data.bank.feats[rows], data.bank.logits[rows]
        terms = loss_fn(feat, t_feat, logits, t_logits, y)
        for name in ("feat", "kd", "ce"):
            meter[name] = meter.get(name, 0.0) + float(getattr(terms, name).detach()) * len(idx)
        return terms.total, int((logits.argmax(1) == y).sum())

    return step


def budget_epochs(cfg: StudentConfig, n_reference: int, n_items: int) -> int:
    """Epochs that give `n_items` tiles as many optimiser steps as `cfg.epochs` over `n_reference`."""
    steps = cfg.epochs * len(batch_bounds(n_reference, cfg.batch_size))
    return max(1, round(steps / len(batch_bounds(n_items, cfg.batch_size))))


def _restore(
    saved: dict[str, Any], run: StudentRun, flips: torch.Generator | None, partners: np.ndarray | None
) -> None:
    """Put a resumed run's own state back: augmentation draws, current partners, rounds, loss terms."""
    if not saved:
        return
    if flips is not None and saved.get("augment_rng") is not None:
        flips.set_state(saved["augment_rng"])
    if partners is not None and saved.get("partners") is not None:
        partners[:] = saved["partners"].numpy()
    run.rounds[:] = [RematchRound(**r) for r in saved.get("rounds", [])]
    run.terms[:] = list(saved.get("terms", []))


def train_student(
    variant: Variant,
    data: StudentSet,
    cfg: StudentConfig,
    arch: SceneCNNConfig,
    seed: int,
    epochs: int,
    checkpoint_dir: Path | None = None,
    on_epoch: Callable[[Trainer, EpochStats], None] | None = None,
    fingerprint: str = "",
) -> StudentRun:
    """Train one student; re-matching runs after every `rematch_every` epochs except the last."""
    device = pick_device()
    seed_everything(seed)
    student = SceneCNN(arch).to(device)
    loss_fn = DistillLoss(
        student.feature_channels,
        w_feat=cfg.w_feat if variant.feature_loss else 0.0,
        w_kd=cfg.w_kd if variant.kd else 0.0,
        w_ce=cfg.w_ce,
        temperature=cfg.temperature,
        heads=cfg.heads,
    ).to(device)
    trainer = Trainer(
        nn.ModuleDict({"student": student, "distill": loss_fn}),
        len(data.labels),
        FitConfig(cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay),
        seed,
        epochs=epochs,
        checkpoint_dir=checkpoint_dir,
        fingerprint=fingerprint,
    )
    partners = None if data.partners is None else data.partners.copy()
    meter: dict[str, float] = {}
    flips = torch.Generator().manual_seed(seed + 1) if cfg.augment else None
    run = StudentRun(student, trainer.history)
    _restore(trainer.resume(), run, flips, partners)
    step = distill_step(student, loss_fn, data, partners, flips, meter)
    for epoch in trainer.remaining:
        stats = trainer.run_epoch(step)
        run.terms.append({k: v / len(data.labels) for k, v in meter.items()})
        meter.clear()
        if variant.rematch and cfg.rematch_every and epoch % cfg.rematch_every == 0 and epoch < epochs:
            assert partners is not None, "re-matching variants have partners"
            new = rematch_partners(student, data, cfg.rematch_scope)
            run.rounds.append(_round(epoch, partners, new, data))
            partners[:] = new
        trainer.save_checkpoint(
            {
                "variant": variant.name,
                "augment_rng": None if flips is None else flips.get_state(),
                "partners": None if partners is None else torch.as_tensor(partners.copy()),
                "rounds": [r.__dict__ for r in run.rounds],
                "terms": run.terms,
            }
        )
        if on_epoch:
            on_epoch(trainer, stats)
    student.eval()
    return run
