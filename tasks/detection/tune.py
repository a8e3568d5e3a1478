"""Few-shot prompt tuning of a ClassMapDetector (only prompts/projections move) and its evaluation.

Training ends when the loss stays under ``loss_threshold`` for ``patience`` consecutive
steps (method B's stop rule; one noisy batch under the line is not enough) or at
``max_steps``; the result says which. Checkpoints hold the prompts, the optimiser and the
batch generator's state, so :func:`tune` can resume one and reproduce the uninterrupted run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ms2rgb.models.clip_detector import ClassMapDetector
from ms2rgb.models.seg_losses import segmentation_loss
from ms2rgb.tasks.config import TuneConfig
from ms2rgb.tasks.data.atomic import write_atomic
from ms2rgb.tasks.data.classes import MASK_NODATA
from ms2rgb.tasks.detection.data import sample_batch
from ms2rgb.tasks.errors import Ms2rgbError
from ms2rgb.tasks.training import distributed
from ms2rgb.tasks.training.augment import random_dihedral
from ms2rgb.tasks.training.loop import adamw, autocast
from ms2rgb.tasks.training.metrics import confusion_matrix, iou_report

STOP_THRESHOLD, STOP_MAX_STEPS = "loss_threshold", "max_steps"


@dataclass
class TuneResult:
    """What one tune() call did."""

    losses: list[float]  # one per step, including steps before a resume
    stopped_by: str  # STOP_THRESHOLD or STOP_MAX_STEPS
    seconds: float  # wall time of this call's steps


def stop_reason(losses: list[float], cfg: TuneConfig) -> str | None:
    """Why training should end now, or None to go on."""
    if len(losses) >= cfg.patience and max(losses[-cfg.patience :]) < cfg.loss_threshold:
        return STOP_THRESHOLD
    return STOP_MAX_STEPS if len(losses) >= cfg.max_steps else None


LAST = "last.pt"  # written when a run ends: resuming from it only re-evaluates


def latest_checkpoint(folder: Path) -> Path | None:
    """The checkpoint a resumed tune() starts from: the finished run's, else the newest step's."""
    if (folder / LAST).is_file():
        return folder / LAST
    steps = sorted(folder.glob("step*.pt"))
    return steps[-1] if steps else None


def save_checkpoint(
    path: Path, detector: ClassMapDetector, opt: torch.optim.Optimizer, rng: np.random.Generator, losses: list[float]
) -> None:
    """Everything :func:`tune` needs to continue exactly where it stopped; older step checkpoints
    go once this one is whole (a kill in between leaves at least one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(
        path,
        lambda tmp: torch.save(
            {
                "step": len(losses),
                "losses": list(losses),
                "tuned_state": detector.tuned_state_dict(),
                "optimizer": opt.state_dict(),
                "rng": rng.bit_generator.state,
            },
            tmp,
        ),
    )
    for older in path.parent.glob("step*.pt"):
        if older != path:
            older.unlink(missing_ok=True)


def _resume(
    path: Path, detector: ClassMapDetector, opt: torch.optim.Optimizer
) -> tuple[np.random.Generator, list[float]]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved = state.get("tuned_state", {})
    missing = set(detector.tuned_state_dict()) - set(saved)
    if missing:
        raise Ms2rgbError(
            f"checkpoint {path} lacks {sorted(missing)}: it was written for another prompt mode or pixel evidence "
            f"setting; delete {path.parent} to tune from the start"
        )
    detector.load_state_dict(saved, strict=False)
    opt.load_state_dict(state["optimizer"])
    rng = np.random.default_rng()
    rng.bit_generator.state = state["rng"]
    return rng, list(state["losses"])


def tune(
    detector: ClassMapDetector,
    images: torch.Tensor,
    masks: torch.Tensor,
    cfg: TuneConfig,
    seed: int,
    device: torch.device,
    checkpoint_dir: Path | None = None,
    resume_from: Path | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> TuneResult:
    """Train the detector's prompts on (images uint8 (N,3,H,W), masks (N,H,W)) with focal + dice."""
    if detector.prompted.num_trainable == 0:
        raise Ms2rgbError(f"mode {detector.prompted.cfg.mode!r} has nothing to train; evaluate it directly")
    detector.to(device).train()
    opt = adamw(detector.trainable_parameters(), cfg.lr, cfg.weight_decay)
    # The pixel evidence is fixed and turns with the tiles (square windows), so it is computed once.
    evidence = None if detector.evidence is None else detector.evidence(images)
    losses: list[float]
    rng, losses = np.random.default_rng(seed), []
    if resume_from is not None:
        rng, losses = _resume(resume_from, detector, opt)
    start = time.perf_counter()
    written_to = checkpoint_dir if distributed.is_writer() else None  # under torchrun, process 0 writes them
    while (reason := stop_reason(losses, cfg)) is None:
        idx = sample_batch(len(images), cfg.batch_size, rng)
        batch = (images[idx], masks[idx]) + (() if evidence is None else (evidence[idx],))
        losses.append(_update(detector, opt, random_dihedral(batch, rng), cfg, device))
        if on_step is not None:
            on_step(len(losses), losses[-1])
        if written_to is not None and len(losses) % cfg.checkpoint_every == 0:
            save_checkpoint(written_to / f"step{len(losses):05d}.pt", detector, opt, rng, losses)
    if written_to is not None:
        save_checkpoint(written_to / "last.pt", detector, opt, rng, losses)
    return TuneResult(losses, reason, time.perf_counter() - start)


def _update(
    detector: ClassMapDetector,
    opt: torch.optim.Optimizer,
    batch: tuple[torch.Tensor, ...],
    cfg: TuneConfig,
    device: torch.device,
) -> float:
    """One step on an augmented batch (images, masks[, evidence]); returns the batch's loss.

    Under torchrun each process takes its slice of the batch; the loss sums its pixels' terms over
    every process (segmentation_loss's `total`), so each holds the whole batch's loss and the stop
    rule ends every process at the same step.
    """
    shared = distributed.active()
    mine = distributed.local_rows(len(batch[0]))
    x, y, *turned = (part[mine] for part in batch)
    with autocast(device):
        logits = detector(x.to(device), turned[0].to(device) if turned else None)
        total = distributed.sum_over_processes if shared else None
        loss = segmentation_loss(logits, y.to(device), gamma=cfg.focal_gamma, total=total)
    opt.zero_grad(set_to_none=True)
    # Every process back-propagates the same whole-batch loss through the summing: 1/N each, then the
    # gradients are summed over the N processes
    (loss / distributed.world_size() if shared else loss).backward()
    distributed.sum_gradients(detector)
    opt.step()
    return float(loss.detach())


@torch.no_grad()
def predict(
    detector: ClassMapDetector, images: torch.Tensor, device: torch.device, batch_size: int = 100
) -> tuple[np.ndarray, float]:
    """Class maps (N, H, W) uint8 for uint8 tiles, and the tiles per second it took."""
    detector.to(device).eval()
    out = []
    start = time.perf_counter()
    for i in range(0, len(images), batch_size):
        with autocast(device):
            out.append(detector(images[i : i + batch_size].to(device)).argmax(dim=1).to(torch.uint8).cpu())
    if device.type == "cuda":
        torch.cuda.synchronize()
    return torch.cat(out).numpy(), len(images) / max(time.perf_counter() - start, 1e-9)


def evaluate(
    detector: ClassMapDetector, images: torch.Tensor, masks: torch.Tensor, device: torch.device, batch_size: int = 100
) -> tuple[dict[str, Any], np.ndarray]:
    """IoU report (plus tiles_per_second) on held-out tiles, and the predicted class maps."""
    pred, tiles_per_second = predict(detector, images, device, batch_size)
    conf = confusion_matrix(masks.numpy(), pred, len(detector.class_names), ignore_index=MASK_NODATA)
    report = iou_report(conf, detector.class_names)
    report["tiles_per_second"] = round(tiles_per_second, 1)
    return report, pred
