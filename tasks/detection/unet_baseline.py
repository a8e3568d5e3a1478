"""Method B's from-scratch baseline: a small U-Net (``models/unet.py``) trained on the same K shots.

It is trained like the prompts (``tasks/detection/tune.py``) except in what moves: the same seeded
batches (``sample_batch``) and dihedral augmentation drawn from one numpy Generator, the same focal +
dice loss with 255 ignored, AdamW; but every weight is trained, from a seeded random init, for a
fixed number of steps under a one-cycle schedule (there is no pretrained start to stay close to).
Tiles enter as uint8 RGB and are z-scored with the RGB bands' statistics inside the model, as the
scene classifiers do, so :func:`predict_unet` takes tiles as stored.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from ms2rgb.models.bands import RGB_BANDS, BandNormalize
from ms2rgb.models.seg_losses import segmentation_loss
from ms2rgb.models.unet import UNet, UNetConfig
from ms2rgb.tasks.config import UNetBaselineConfig
from ms2rgb.tasks.data.classes import MASK_NODATA
from ms2rgb.tasks.detection.data import sample_batch
from ms2rgb.tasks.training.augment import random_dihedral
from ms2rgb.tasks.training.loop import adamw, autocast, seed_everything


def build_unet(n_classes: int, cfg: UNetBaselineConfig, seed: int) -> nn.Sequential:
    """uint8 RGB (B, 3, H, W) -> logits (B, K, H, W): band normalisation, then a seeded fresh U-Net."""
    seed_everything(seed)
    unet = UNet(UNetConfig(n_classes=n_classes, width=cfg.width, depth=cfg.depth))
    return nn.Sequential(BandNormalize(RGB_BANDS, from_8bit=True), unet)


def train_unet(
    model: nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    cfg: UNetBaselineConfig,
    seed: int,
    device: torch.device,
    focal_gamma: float,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """``cfg.steps`` steps on (images uint8 (N, 3, H, W), masks (N, H, W)); the loss of each step."""
    model.to(device).train()
    opt = adamw(model.parameters(), cfg.lr, cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps)
    rng, losses = np.random.default_rng(seed), []
    for step in range(1, cfg.steps + 1):
        idx = sample_batch(len(images), cfg.batch_size, rng)
        x, y = random_dihedral((images[idx], masks[idx]), rng)
        with autocast(device):
            loss = segmentation_loss(model(x.to(device)), y.to(device), gamma=focal_gamma, ignore_index=MASK_NODATA)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, losses[-1])
    return losses


@torch.no_grad()
def predict_unet(model: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 100) -> np.ndarray:
    """Class maps (N, H, W) uint8 of uint8 tiles."""
    model.to(device).eval()
    out = []
    for i in range(0, len(images), batch_size):
        with autocast(device):
            out.append(model(images[i : i + batch_size].to(device)).argmax(dim=1).to(torch.uint8).cpu())
    return torch.cat(out).numpy()
