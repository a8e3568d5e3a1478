"""Shared training plumbing: device, seeding, the optimisation loop, checkpoints, batches.

Augmentation lives in `augment.py`, scores in `metrics.py`.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ms2rgb.tasks.data.atomic import write_atomic
from ms2rgb.tasks.errors import Ms2rgbError
from ms2rgb.tasks.training import distributed
from ms2rgb.tasks.training.augment import random_dihedral


class DeviceChoice:
    """params.yaml `compute.device` for this process: the stage runner sets it before every stage and
    each worker before every cell, so code deep in a stage asks `pick_device()` instead of the params."""

    requested = "auto"


def resolve_device(requested: str) -> torch.device:
    """`auto`: CUDA when present, else CPU (CI and the dev machines have no GPU); `cpu`, `cuda` or
    `cuda:N` as named, and an error naming the key when CUDA is asked for and torch sees none."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise Ms2rgbError(
            f"compute.device: {requested} but torch sees no CUDA device (CPU-only build, or no GPU here); "
            "set compute.device: auto or cpu"
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise Ms2rgbError(
            f"compute.device: {requested} but torch sees {torch.cuda.device_count()} CUDA device(s); "
            f"name one of cuda:0..cuda:{torch.cuda.device_count() - 1}, or auto"
        )
    return device


def use_device(requested: str) -> None:
    """Make `requested` (compute.device) what `pick_device()` returns in this process; fails at once
    when it names a device that is not there."""
    resolve_device(requested)
    DeviceChoice.requested = requested


def pick_device() -> torch.device:
    """The device the project trains and scores on: params' `compute.device` (see `use_device`)."""
    return resolve_device(DeviceChoice.requested)


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a torch generator for data order."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def make_deterministic(threads: int) -> None:
    """Same data, params and seed give bit-identical CPU results, on any machine of the same CPU family.

    CPU kernels split reductions by the intra-op thread count, so the count is fixed (not the
    machine's core count); deterministic algorithms are asked for where torch has a choice.
    """
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)


def autocast(device: torch.device):
    """bf16 autocast on CUDA; a no-op on CPU so CPU metrics stay exactly reproducible."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


@dataclass(frozen=True)
class FitConfig:
    """The optimisation budget every training stage hands the loop (values from params.yaml)."""

    epochs: int  # passes over the training set
    batch_size: int  # tiles per step
    lr: float  # AdamW peak learning rate (one-cycle schedule)
    weight_decay: float


@dataclass(frozen=True)
class EpochStats:
    """What one epoch of training did; `accuracy` is on the training batches as they were seen."""

    epoch: int
    loss: float
    accuracy: float
    seconds: float


# Batch indices -> (loss to minimise, correct predictions, items with a label to be right about).
# Under `compute.nproc` > 1 a step gets the global batch's indices and works on its process's slice
# of them (distributed.local_rows, cut after any random augmentation of the whole batch, so every
# process draws what one process would): the loss is that slice's mean, the counts the slice's.
StepFn = Callable[[np.ndarray], tuple[torch.Tensor, int, int]]


def batch_bounds(n_items: int, batch_size: int, min_batch: int = 1) -> list[tuple[int, int]]:
    """(begin, end) of each batch; a trailing batch under `min_batch` items joins the one before.

    In-batch negatives (the matcher) need a batch that spans several classes, which a
    runt batch of one or two tiles may not.
    """
    bounds = [(b, min(b + batch_size, n_items)) for b in range(0, n_items, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < min_batch:
        bounds[-2:] = [(bounds[-2][0], n_items)]
    return bounds


def adamw(params: Iterable[Any], lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW as one fused kernel over every parameter (CPU and CUDA): the same update rule, without
    a Python loop per tensor (35 ms -> 6 ms a step for the 8M-parameter fallback CLIP on 2 cores).
    `params` may be parameter groups, each with its own weight decay."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


def restore_cuda_rng(states: list[torch.Tensor]) -> None:
    """Put back the CUDA generators a checkpoint saved, when this process has the same GPUs; a
    checkpoint written on CPU (none saved) or for other GPUs leaves them as seeded."""
    if states and torch.cuda.is_available() and len(states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states)


class Trainer:
    """AdamW with a one-cycle schedule over `module`'s parameters, in a seeded batch order.

    The step function owns the forward pass; the trainer owns order, optimisation, timing and
    what a checkpoint holds. Across processes (distributed.py) it weights each slice's loss by its
    share of the batch and sums the gradients, so every process takes the one-process step; only
    process 0 writes checkpoints. With a `checkpoint_dir`, the caller writes a checkpoint after every
    epoch (`save_checkpoint`: weights, optimizer, scheduler, data-order generator, torch RNG,
    history and the caller's own state, e.g. its augmentation generator); only the newest is kept.
    `resume` continues a killed run from it, and the run then ends exactly as an uninterrupted
    one would. A checkpoint is used only by a run with the same `fingerprint` (config, seed, data).
    """

    def __init__(
        self,
        module: nn.Module,
        n_items: int,
        cfg: FitConfig,
        seed: int,
        epochs: int | None = None,
        checkpoint_dir: Path | None = None,
        min_batch: int = 1,
        fingerprint: str = "",
    ) -> None:
        if n_items < 1:
            raise ValueError(f"n_items={n_items}: there is nothing to train on")
        self.module, self.n_items, self.cfg = module, n_items, cfg
        self.epochs = epochs or cfg.epochs
        self.checkpoint_dir, self.fingerprint = checkpoint_dir, fingerprint
        # every process needs a row of each batch (an empty slice's mean loss is NaN)
        self.bounds = batch_bounds(n_items, cfg.batch_size, max(min_batch, distributed.world_size()))
        self.generator = torch.Generator().manual_seed(seed)
        self.optimizer = adamw(module.parameters(), cfg.lr, cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer, max_lr=cfg.lr, total_steps=self.epochs * len(self.bounds)
        )
        self.history: list[EpochStats] = []
        distributed.broadcast_module(module)

    def run_epoch(self, step: StepFn) -> EpochStats:
        """One pass over the items in a fresh seeded order."""
        device = next(self.module.parameters()).device
        self.module.train()
        start, sums = time.perf_counter(), [0.0, 0.0, 0.0]  # loss x items, correct, labelled items
        order = torch.randperm(self.n_items, generator=self.generator).numpy()
        with distributed.synced_batch_norm(self.module):
            for begin, end in self.bounds:
                loss, hits, labelled = self._update(step, order[begin:end], device)
                sums = [sums[0] + loss * (end - begin), sums[1] + hits, sums[2] + labelled]
        total, correct, scored = distributed.sum_numbers(sums)
        accuracy = correct / max(scored, 1)  # of the labelled items: hidden labels cannot be right or wrong
        stats = EpochStats(len(self.history), total / self.n_items, accuracy, time.perf_counter() - start)
        self.history.append(stats)
        return stats

    def _update(self, step: StepFn, idx: np.ndarray, device: torch.device) -> tuple[float, int, int]:
        """One optimiser step on the batch `idx`: its loss (this process's part of it) and counts."""
        with autocast(device):
            loss, hits, labelled = step(idx)
        if distributed.active():  # this slice's part of the global batch's mean
            loss = loss * distributed.local_share(len(idx))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        distributed.sum_gradients(self.module)
        self.optimizer.step()
        self.scheduler.step()
        return float(loss.detach()), hits, labelled

    def save_checkpoint(self, extra: dict[str, Any] | None = None) -> Path | None:
        """checkpoints/epoch_XXX.pt for the last finished epoch; None without a checkpoint_dir."""
        if self.checkpoint_dir is None or not self.history or not distributed.is_writer():
            return None
        path = self.checkpoint_dir / f"epoch_{self.history[-1].epoch:03d}.pt"
        state = {
            "fingerprint": self.fingerprint,
            "epoch": self.history[-1].epoch,
            "epochs": self.epochs,
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            # each GPU's generator too (dropout, random augmentation on the device), so a resumed CUDA
            # run draws what the uninterrupted one would; empty on CPU
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "history": [asdict(h) for h in self.history],
            "extra": extra or {},
        }
        write_atomic(path, lambda tmp: torch.save(state, tmp))  # a kill mid-write leaves the previous one
        for old in self.checkpoint_dir.glob("epoch_*.pt"):
            if old != path:
                old.unlink()
        return path

    def resume(self) -> dict[str, Any]:
        """Continue from this run's newest checkpoint, if any; return the caller state saved with it.

        A checkpoint of another run (other config, seed or data: another fingerprint) or of another
        length is removed instead, so it can never leak into this run.
        """
        if self.checkpoint_dir is None:
            return {}
        for path in sorted(self.checkpoint_dir.glob("epoch_*.pt"), reverse=True):
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except FileNotFoundError:  # another run's, just removed by process 0
                continue
            if state.get("fingerprint") != self.fingerprint or state.get("epochs") != self.epochs:
                if distributed.is_writer():
                    path.unlink()
                continue
            self.module.load_state_dict(state["module"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.generator.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            restore_cuda_rng(state.get("cuda_rng", []))
            self.history[:] = [EpochStats(**h) for h in state["history"]]
            print(f"resumed from {path} (epoch {len(self.history)}/{self.epochs})", flush=True)
            return dict(state["extra"])
        return {}

    @property
    def remaining(self) -> range:
        """Epoch numbers (1-based) still to run: all of them, or those after a resumed checkpoint."""
        return range(len(self.history) + 1, self.epochs + 1)

    def describe(self, name: str, stats: EpochStats) -> str:
        """One progress line: which run, epoch, loss, accuracy and seconds."""
        return (
            f"{name}: epoch {stats.epoch + 1}/{self.epochs} loss {stats.loss:.4f} "
            f"train acc {stats.accuracy:.3f} ({stats.seconds:.1f} s)"
        )


def fingerprint(*parts: Any) -> str:
    """A short hash naming one training run (config, seed, data): checkpoints are only resumed by
    the run that wrote them."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def to_tensor(images: np.ndarray, idx: np.ndarray | None = None) -> torch.Tensor:
    """Rows `idx` (all when None) of a uint8/uint16 tile array as a float32 tensor."""
    rows = images if idx is None else images[idx]
    return torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))


def batches(images: np.ndarray, order: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Yield (index, float tensor) batches from a (memory-mapped) array in the given order."""
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        # Sorted reads are sequential on a memmap; the second argsort restores the asked order.
        yield idx, torch.from_numpy(np.ascontiguousarray(images[np.sort(idx)][np.argsort(np.argsort(idx))])).float()


def fit_classifier(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    cfg: FitConfig,
    seed: int,
    on_epoch: Callable[[Trainer, EpochStats], None] | None = None,
    augment: bool = False,
    checkpoint_dir: Path | None = None,
    fingerprint: str = "",
) -> list[EpochStats]:
    """Train with cross-entropy on tiles held in memory; `on_epoch(trainer, stats)` after each epoch."""
    device = pick_device()
    seed_everything(seed)
    model.to(device)
    trainer = Trainer(model, len(labels), cfg, seed, checkpoint_dir=checkpoint_dir, fingerprint=fingerprint)
    flips = torch.Generator().manual_seed(seed + 1)
    saved = trainer.resume()
    if "augment_rng" in saved:
        flips.set_state(saved["augment_rng"])
    y_all = torch.as_tensor(np.array(labels), dtype=torch.long)  # a copy: memmap labels are read-only

    def step(idx: np.ndarray) -> tuple[torch.Tensor, int, int]:
        x = to_tensor(images, idx)
        if augment:
            (x,) = random_dihedral((x,), flips)
        mine = distributed.local_rows(len(idx))
        x, y = x[mine], y_all[idx][mine].to(device)
        logits = model(x.to(device))
        return nn.functional.cross_entropy(logits, y), int((logits.argmax(1) == y).sum()), len(idx)

    for _ in trainer.remaining:
        stats = trainer.run_epoch(step)
        trainer.save_checkpoint({"augment_rng": flips.get_state()})
        if on_epoch:
            on_epoch(trainer, stats)
    return trainer.history
