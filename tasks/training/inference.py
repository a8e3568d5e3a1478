"""Running trained models over cached tiles: logits, class distributions and embeddings, in order."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from ms2rgb.models.classifier import SceneCNN
from ms2rgb.models.matcher import CrossModalMatcher
from ms2rgb.tasks.data.pairing import PairSet
from ms2rgb.tasks.training.loop import autocast, batches, pick_device


@torch.no_grad()
def predict(
    fn: Callable[[torch.Tensor], torch.Tensor], images: np.ndarray, device: torch.device, batch_size: int = 256
) -> torch.Tensor:
    """fn(batch on `device`) for every tile, in order, concatenated as float32 on CPU.

    The caller puts the modules behind `fn` in eval mode (BatchNorm running stats, no dropout).
    """
    out = []
    for _, x in batches(images, np.arange(len(images)), batch_size):
        with autocast(device):
            out.append(fn(x.to(device)).float().cpu())
    return torch.cat(out)


def predict_logits(model: nn.Module, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """Logits for every tile, in order, on CPU."""
    device = pick_device()
    return predict(model.to(device).eval(), images, device, batch_size)


def embed(matcher: CrossModalMatcher, images: np.ndarray, modality: str) -> torch.Tensor:
    """(N, D) unit embeddings of every tile through the tower of `modality` (rgb | ms)."""
    device = next(matcher.parameters()).device
    tower = matcher.embed_rgb if modality == "rgb" else matcher.embed_ms
    return predict(tower, images, device)


def teacher_probs(teacher: SceneCNN, images: np.ndarray, batch_size: int) -> torch.Tensor:
    """(N, n_classes) teacher class distribution of every MS tile (T = 1)."""
    device = pick_device()
    return predict(teacher.to(device).eval(), images, device, batch_size).softmax(dim=1)


def retrieval(matcher: CrossModalMatcher, pairs: PairSet) -> dict[str, float]:
    """Rank of each RGB tile's true MS partner among all MS tiles of the set."""
    scores = matcher.score(embed(matcher, pairs.rgb, "rgb"), embed(matcher, pairs.ms, "ms"))  # (N, N)
    true = scores.diagonal().unsqueeze(1)  # (N, 1)
    rank = (scores > true).sum(1)  # (N,) 0 = partner scored best
    best = scores.argmax(1).numpy()
    return {
        "pair_top1": float((rank < 1).float().mean()),
        "pair_top5": float((rank < 5).float().mean()),
        "pair_same_class_rate": float((pairs.labels[best] == pairs.labels).mean()),
        "pair_chance_top1": 1.0 / len(pairs.labels),
    }
