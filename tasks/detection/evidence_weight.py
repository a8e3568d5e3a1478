"""The pixel evidence's starting weight, chosen on the shots by two-fold cross-fitting (``init_weight: auto``).

Tuning stops at the loss threshold after a handful of steps, so the weight that multiplies the
evidence barely leaves where it starts, and the best start differs by data: for the per-pixel
network 0.3 suits the embedded default, 1.0 real scene tiles (README, Method B). The shots
cannot score a weight directly, since an expert fitted on them is sure of their every pixel. So
the shot tiles are split in two folds; the expert fitted on one fold scores the other's labelled
pixels beside the untuned CLIP's logits, and the weight with the lowest mean cross-entropy over
both folds wins. No test tile is read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ms2rgb.models.clip_detector import ClassMapDetector
from ms2rgb.models.pixel_evidence import NODATA, PixelEvidence

AUTO_FALLBACK_WEIGHT = 0.3  # where nothing can be held out (a fold without labelled pixels)
WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0)  # the candidates, on the scale of init_weight

FitEvidence = Callable[[torch.Tensor, torch.Tensor], PixelEvidence]


@torch.no_grad()
def cross_fitted_weight(
    detector: ClassMapDetector,
    fit: FitEvidence,
    images: torch.Tensor,
    masks: torch.Tensor,
    batch_size: int,
    fallback: float,
    device: torch.device,
    weights: Sequence[float] = WEIGHTS,
) -> float:
    """The candidate weight whose CLIP logits + weight x held-out evidence fit the shots' labels best.

    ``images`` uint8 (N, 3, H, W) and ``masks`` (N, H, W) are the shots; tiles alternate between the
    folds. Where a fold holds no labelled pixel nothing can be held out, and ``fallback`` is returned.
    """
    folds = (torch.arange(len(images)) % 2 == 0, torch.arange(len(images)) % 2 == 1)
    if any(bool((masks[fold] == NODATA).all()) for fold in folds):
        return fallback
    detector.to(device).eval()
    clip_logits = torch.cat(
        [
            detector.logits_for(images[i : i + batch_size].to(device), detector.text_tokens).cpu()
            for i in range(0, len(images), batch_size)
        ]
    )
    losses = torch.zeros(len(weights))
    for fitted_on, held_out in (folds, folds[::-1]):
        evidence = fit(images[fitted_on], masks[fitted_on]).cpu()(images[held_out])
        labels = masks[held_out].long()
        for j, weight in enumerate(weights):
            combined = clip_logits[held_out] + weight * evidence
            losses[j] += F.cross_entropy(combined, labels, ignore_index=NODATA, reduction="sum")
    return float(weights[int(losses.argmin())])
