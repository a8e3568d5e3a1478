"""Training one RGB student (docs/methods.md §A.4–§A.7): the full method or one of its baselines/ablations.

A student trains on RGB tiles, some labelled (label >= 0) and some not (label -1: the label exists
in the manifest but is hidden from training). Each tile may have a partner row in a bank of frozen
teacher outputs (features and logits of MS tiles) and a confidence weight for that pair. Variants
(tasks/training/variants.py) differ only in the set, the partners and the loss terms, so every
comparison shares data, optimiser steps and seeds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ms2rgb.models.assignment import sinkhorn_plan
from ms2rgb.models.classifier import SceneCNN, SceneCNNConfig
from ms2rgb.models.distill import DistillLoss, js_divergence, self_training_loss
from ms2rgb.tasks.config import StudentConfig
from ms2rgb.tasks.data.pool import candidates_by_class
from ms2rgb.tasks.training import distributed
from ms2rgb.tasks.training.augment import dihedral, random_dihedral, strong_augment
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
from ms2rgb.tasks.training.variants import Variant

# Balancing rounds of a re-matching assignment; as pairs.sinkhorn_iters, which converges well before.
REMATCH_SINKHORN_ITERS = 50
CHECKPOINTS_PER_RUN = 50  # small sets train for hundreds of short epochs: a checkpoint every epoch would dominate


@dataclass
class TeacherBank:
    """Frozen teacher outputs for the MS tiles a student may be paired with, computed once."""

    feats: torch.Tensor  # (M, C, 8, 8) on the training device
    logits: torch.Tensor  # (M, n_classes) on the training device
    classes: np.ndarray  # (M,) teacher class
    confidence: np.ndarray  # (M,) teacher max probability (T = 1)

    def probs(self, temperature: float) -> torch.Tensor:
        """(M, n_classes) teacher distributions at `temperature`, on CPU."""
        return (self.logits.float() / temperature).softmax(1).cpu()


@dataclass
class StudentSet:
    """RGB training tiles, their labels (-1: hidden) and, with a teacher bank, partners and pair weights."""

    rgb: np.ndarray  # (N, 3, H, W) uint8
    labels: np.ndarray  # (N,) int64, -1 for tiles trained without their label
    bank: TeacherBank | None
    partners: np.ndarray | None  # (N,) int64 rows into bank
    weights: np.ndarray | None  # (N,) float32 confidence of each pair (1 for labelled tiles)
    labelled_share: float = 0.25  # least share of each epoch's visits that are labelled tiles

    def visits(self) -> np.ndarray:
        """Rows one epoch visits: every tile once, labelled ones repeated up to `labelled_share`.

        Why: with 5 labels per class against thousands of unlabelled tiles, a plain pass would show
        the cross-entropy a labelled tile about once per epoch; FixMatch-style training keeps a fixed
        share of each batch labelled instead.
        """
        labelled, unlabelled = np.flatnonzero(self.labels >= 0), np.flatnonzero(self.labels < 0)
        if len(unlabelled) == 0 or len(labelled) == 0:
            return np.arange(len(self.labels))
        share = self.labelled_share
        repeats = max(1, math.ceil(share * len(unlabelled) / ((1 - share) * len(labelled)))) if share < 1 else 1
        return np.concatenate([unlabelled, np.tile(labelled, repeats)])


@dataclass(frozen=True)
class RematchRound:
    epoch: int  # 1-based epoch after which the round ran
    changed: float  # share of RGB tiles whose partner changed
    same_class_rate: float  # share whose partner's teacher class is the tile's true class
    pseudo_label_accuracy: float | None  # the same over the unlabelled tiles only
    mean_weight: float  # mean confidence weight of the unlabelled tiles' pairs


@dataclass
class StudentRun:
    model: SceneCNN
    history: list[EpochStats]
    terms: list[dict[str, float]] = field(default_factory=list)  # per-epoch mean of feat/kd/ce/st
    rounds: list[RematchRound] = field(default_factory=list)


@torch.no_grad()
def teacher_bank(teacher: SceneCNN, ms: np.ndarray) -> TeacherBank:
    """Run the frozen teacher once over `ms` tiles."""
    device = pick_device()
    teacher.to(device).eval()
    feats = predict(teacher.encode, ms, device).to(device)  # (M, C, 8, 8)
    logits = teacher.classify(feats).float()
    probs = logits.softmax(1).cpu()
    return TeacherBank(feats, logits, probs.argmax(1).numpy(), probs.max(1).values.numpy())


def join_banks(a: TeacherBank, b: TeacherBank) -> TeacherBank:
    """One bank holding a's rows, then b's."""
    return TeacherBank(
        torch.cat([a.feats, b.feats]),
        torch.cat([a.logits, b.logits]),
        np.concatenate([a.classes, b.classes]),
        np.concatenate([a.confidence, b.confidence]),
    )


def random_partners(classes: np.ndarray, bank: TeacherBank, seed: int) -> np.ndarray:
    """A uniformly drawn MS tile of the given (teacher) class for every RGB tile."""
    rng = np.random.default_rng(seed)
    partners = np.empty(len(classes), dtype=np.int64)
    for c, rows in candidates_by_class(bank.classes, classes, "ms_pool").rows.items():
        where = np.flatnonzero(classes == c)
        partners[where] = rng.choice(rows, size=len(where))
    return partners


# Symmetry codes in the order views are added: identity, mirror, half turn, ... (augment.dihedral).
VIEW_ORDER = (0, 4, 2, 6, 1, 5, 3, 7)


@torch.no_grad()
def smoothed_logits(student: SceneCNN, rgb: np.ndarray, views: int) -> torch.Tensor:
    """(N, n_classes) student logits averaged over `views` flips/rotations: a steadier prediction to
    re-match on than one view, so a round does not chase one augmentation's noise. Each view is a
    pass over every tile; the training-time augmentation already makes the student near invariant,
    so two views (identity and mirror) buy most of the steadiness."""
    device = next(student.parameters()).device
    student.eval()

    def view(k: int) -> torch.Tensor:
        return predict(lambda x: student(dihedral(x, k)), rgb, device)

    return torch.stack([view(k) for k in VIEW_ORDER[:views]]).mean(0)


def rematch_partners(student: SceneCNN, data: StudentSet, cfg: StudentConfig) -> tuple[np.ndarray, np.ndarray]:
    """A.6: new partners and weights from the student's smoothed prediction, at the KD temperature.

    Labelled tiles keep the method's premise: the closest (Jensen-Shannon) MS tile of their class.
    Unlabelled tiles are matched over the whole pool by a balanced assignment (Sinkhorn on -JS /
    rematch_epsilon), so no MS tile takes most of them; their weight becomes the student's
    (flip-averaged, T = 1) probability of the new partner's class times the teacher's confidence.
    """
    bank, partners, weights = data.bank, data.partners, data.weights
    assert bank is not None and partners is not None and weights is not None, "re-matching needs partners"
    logits = smoothed_logits(student, data.rgb, cfg.rematch_views)
    student_t, teacher_t = (logits / cfg.temperature).softmax(1), bank.probs(cfg.temperature)
    new, new_weights = partners.copy(), weights.copy()
    labelled = data.labels >= 0
    for c, cols in candidates_by_class(bank.classes, data.labels[labelled], "ms_pool").rows.items():
        rows = np.flatnonzero(data.labels == c)
        new[rows] = cols[js_divergence(student_t[rows], teacher_t[cols]).argmin(1).numpy()]
    free = np.flatnonzero(~labelled)
    if len(free):
        plan = sinkhorn_plan(-js_divergence(student_t[free], teacher_t) / cfg.rematch_epsilon, REMATCH_SINKHORN_ITERS)
        new[free] = plan.argmax(1).numpy()
        probs = logits[free].softmax(1).numpy()
        new_weights[free] = probs[np.arange(len(free)), bank.classes[new[free]]] * bank.confidence[new[free]]
    return new, new_weights.astype(np.float32)


def _round(epoch: int, old: np.ndarray, data: StudentSet, truth: np.ndarray) -> RematchRound:
    """What a round did, scored with the true classes (`truth`), which training never sees."""
    assert data.bank is not None and data.partners is not None and data.weights is not None
    right = data.bank.classes[data.partners] == truth
    free = data.labels < 0
    return RematchRound(
        epoch,
        float((old != data.partners).mean()),
        float(right.mean()),
        float(right[free].mean()) if free.any() else None,
        float(data.weights[free].mean()) if free.any() else 1.0,
    )


def rematch_epochs(epochs: int, rounds: int) -> set[int]:
    """Epochs (1-based) after which a re-matching round runs: `rounds` of them, evenly spread, never the last."""
    return {e for r in range(1, rounds + 1) if 0 < (e := round(r * epochs / (rounds + 1))) < epochs}


def distill_step(
    student: SceneCNN,
    loss_fn: DistillLoss,
    data: StudentSet,
    visits: np.ndarray,
    variant: Variant,
    cfg: StudentConfig,
    augment: torch.Generator | None,
    strong_draws: torch.Generator,
    meter: dict[str, float],
) -> StepFn:
    """The Trainer step; reads `data.partners`/`data.weights` at call time, so re-matching in place takes effect."""
    device = next(student.parameters()).device
    labels = torch.as_tensor(np.array(data.labels))  # a copy: cached labels are read-only

    def step(idx: np.ndarray) -> tuple[torch.Tensor, int, int]:
        rows = visits[idx]
        x = to_tensor(data.rgb, rows)
        if augment is not None:
            (x,) = random_dihedral((x,), augment)
        # Strong views are drawn for the whole batch's unlabelled tiles, as one process draws them,
        # then each process keeps its slice's (distributed.local_rows).
        hidden = labels[rows] < 0
        strong_views = strong_augment(x[hidden], strong_draws) if variant.self_training and hidden.any() else None
        mine = distributed.local_rows(len(idx))
        first, count = int(hidden[: mine.start].sum()), int(hidden[mine].sum())
        x, rows = x[mine], rows[mine]
        y = labels[rows].to(device)
        feat = student.encode(x.to(device))  # (B, C, 8, 8)
        logits = student.classify(feat)
        t_feat = t_logits = w = None
        if data.bank is not None:
            assert data.partners is not None and data.weights is not None, "a bank comes with partners"
            pick = torch.as_tensor(data.partners[rows], device=device)
            t_feat, t_logits = data.bank.feats[pick], data.bank.logits[pick]
            w = torch.as_tensor(data.weights[rows], device=device)
        terms = loss_fn(feat, t_feat, logits, t_logits, y, w)
        total, st = terms.total, torch.zeros(())
        unlabelled = y < 0
        if strong_views is not None and count:
            strong = strong_views[first : first + count].to(device)
            st = self_training_loss(student(strong), logits[unlabelled], cfg.self_training_threshold)
            total = total + cfg.w_self_training * st
        share = distributed.local_share(len(idx))  # 1 in one process; the epoch's sums add the slices
        for name, value in (("feat", terms.feat), ("kd", terms.kd), ("ce", terms.ce), ("st", st)):
            meter[name] = meter.get(name, 0.0) + float(value.detach()) * len(idx) * share
        known = ~unlabelled
        return total, int((logits.argmax(1)[known] == y[known]).sum()), int(known.sum())

    return step


def epochs_for(cfg: StudentConfig, n_visits: int) -> int:
    """Epochs that make `cfg.steps` optimiser steps over an epoch of `n_visits` rows."""
    return max(1, round(cfg.steps / len(batch_bounds(n_visits, cfg.batch_size))))


def _restore(
    saved: dict[str, Any], run: StudentRun, draws: tuple[torch.Generator | None, torch.Generator], data: StudentSet
) -> None:
    """Put a resumed run's own state back: augmentation draws, current partners and weights, rounds, terms."""
    if not saved:
        return
    flips, strong = draws
    if flips is not None and saved.get("augment_rng") is not None:
        flips.set_state(saved["augment_rng"])
    strong.set_state(saved["strong_rng"])
    if data.partners is not None and saved.get("partners") is not None:
        data.partners[:] = saved["partners"].numpy()
        assert data.weights is not None
        data.weights[:] = saved["weights"].numpy()
    run.rounds[:] = [RematchRound(**r) for r in saved.get("rounds", [])]
    run.terms[:] = list(saved.get("terms", []))


def _state(
    variant: Variant, draws: tuple[torch.Generator | None, torch.Generator], data: StudentSet, run: StudentRun
) -> dict[str, Any]:
    """The student's own part of a checkpoint."""
    flips, strong = draws
    return {
        "variant": variant.name,
        "augment_rng": None if flips is None else flips.get_state(),
        "strong_rng": strong.get_state(),
        "partners": None if data.partners is None else torch.as_tensor(data.partners.copy()),
        "weights": None if data.weights is None else torch.as_tensor(data.weights.copy()),
        "rounds": [r.__dict__ for r in run.rounds],
        "terms": run.terms,
    }


def train_student(
    variant: Variant,
    data: StudentSet,
    cfg: StudentConfig,
    arch: SceneCNNConfig,
    seed: int,
    truth: np.ndarray,
    checkpoint_dir: Path | None = None,
    on_epoch: Callable[[Trainer, EpochStats], None] | None = None,
    fingerprint: str = "",
) -> StudentRun:
    """Train one student for `cfg.steps` steps. `truth` (every tile's true class) only scores the
    re-matching rounds; the loss sees `data.labels`, where hidden labels are -1."""
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
        label_smoothing=variant.label_smoothing,
    ).to(device)
    data = replace(  # re-matching edits partners and weights: never the caller's
        data,
        partners=None if data.partners is None else data.partners.copy(),
        weights=None if data.weights is None else data.weights.copy(),
    )
    visits = data.visits()
    epochs = epochs_for(cfg, len(visits))
    trainer = Trainer(
        nn.ModuleDict({"student": student, "distill": loss_fn}),
        len(visits),
        FitConfig(epochs, cfg.batch_size, cfg.lr, cfg.weight_decay),
        seed,
        checkpoint_dir=checkpoint_dir,
        fingerprint=fingerprint,
    )
    meter: dict[str, float] = {}
    flips = torch.Generator().manual_seed(seed + 1) if cfg.augment else None
    strong = torch.Generator().manual_seed(seed + 2)  # FixMatch's strong views
    run = StudentRun(student, trainer.history)
    _restore(trainer.resume(), run, (flips, strong), data)
    step = distill_step(student, loss_fn, data, visits, variant, cfg, flips, strong, meter)
    rounds = rematch_epochs(epochs, cfg.rematch_rounds) if variant.rematch else set()
    save_every = max(1, epochs // CHECKPOINTS_PER_RUN)
    for epoch in trainer.remaining:
        stats = trainer.run_epoch(step)
        sums = distributed.sum_numbers(list(meter.values()))
        run.terms.append({k: v / len(visits) for k, v in zip(meter, sums, strict=True)})
        meter.clear()
        if epoch in rounds:
            old = data.partners.copy() if data.partners is not None else np.empty(0)
            data.partners, data.weights = rematch_partners(student, data, cfg)
            run.rounds.append(_round(epoch, old, data, truth))
        if epoch % save_every == 0 or epoch == epochs:
            trainer.save_checkpoint(_state(variant, (flips, strong), data, run))
        if on_epoch:
            on_epoch(trainer, stats)
    student.eval()
    return run
