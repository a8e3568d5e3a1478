"""Shared training plumbing: device choice, seeding, batched fitting and evaluation of classifiers."""
from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


def pick_device() -> torch.device:
    """CUDA when present, else CPU. CI and the dev machines have no GPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a torch generator for data order."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def autocast(device: torch.device):
    """bf16 autocast on CUDA; a no-op on CPU so CPU metrics stay exactly reproducible."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


@dataclass(frozen=True)
class FitConfig:
    epochs: int = 10          # passes over the training set
    batch_size: int = 64      # tiles per step
    lr: float = 2e-3          # AdamW learning rate
    weight_decay: float = 1e-4


def batches(images: np.ndarray, order: np.ndarray, batch_size: int):
    """Yield (index, float tensor) batches from a (memory-mapped) array in the given order."""
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        yield idx, torch.from_numpy(np.ascontiguousarray(images[np.sort(idx)][np.argsort(np.argsort(idx))])).float()


def fit_classifier(model: nn.Module, images: np.ndarray, labels: np.ndarray, cfg: FitConfig, seed: int,
                   on_epoch: Callable[[int, float, float], None] | None = None) -> list[float]:
    """Train with cross-entropy; returns per-epoch mean loss. `on_epoch(epoch, loss, seconds)`."""
    device = pick_device()
    gen = seed_everything(seed)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=cfg.epochs * -(-len(labels) // cfg.batch_size))
    y_all = torch.as_tensor(np.array(labels), dtype=torch.long)
    history = []
    for epoch in range(cfg.epochs):
        start, total = time.perf_counter(), 0.0
        order = torch.randperm(len(labels), generator=gen).numpy()
        for idx, x in batches(images, order, cfg.batch_size):
            with autocast(device):
                loss = nn.functional.cross_entropy(model(x.to(device)), y_all[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        history.append(total / len(labels))
        if on_epoch:
            on_epoch(epoch, history[-1], time.perf_counter() - start)
    return history


@torch.no_grad()
def predict_logits(model: nn.Module, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """Logits for every tile, in order, on CPU."""
    device = pick_device()
    model.to(device).eval()
    out = []
    for _, x in batches(images, np.arange(len(images)), batch_size):
        with autocast(device):
            out.append(model(x.to(device)).float().cpu())
    return torch.cat(out)


def accuracy_report(logits: torch.Tensor, labels: np.ndarray, class_names: list[str]) -> dict:
    """Overall and per-class accuracy."""
    pred = logits.argmax(1).numpy()
    per_class = {name: float((pred[labels == i] == i).mean()) for i, name in enumerate(class_names)
                 if (labels == i).any()}
    return {"accuracy": float((pred == labels).mean()), "per_class": per_class}
