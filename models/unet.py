"""A small U-Net (Ronneberger et al. 2015) for per-pixel land cover: method B's from-scratch baseline.

Normalised float RGB (B, C, H, W) in, logits (B, K, H, W) out at the input's resolution. Each of
``depth`` stages halves the side with a 2x2 max-pool and doubles the channels; the decoder undoes
that with 2x2 transposed convolutions and merges the encoder map of the same side (the skip). So H
and W must be multiples of 2**depth. The caller normalises (e.g. ``BandNormalize``): this module
stays a plain network that any band set can feed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ms2rgb.models.bands import BandMismatchError


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of a ``UNet``."""

    n_classes: int  # output channels: one logit per class
    in_channels: int = 3  # input channels (normalised RGB)
    width: int = 16  # channels of the full-resolution stage; doubled at each downsampling
    depth: int = 3  # downsamplings: the bottleneck runs at side / 2**depth

    def __post_init__(self) -> None:
        for name in ("n_classes", "in_channels", "width", "depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"UNetConfig.{name}={getattr(self, name)}: must be >= 1")


def _double_conv(c_in: int, c_out: int) -> nn.Sequential:
    """(conv3x3-BN-ReLU) x 2; no conv bias because BN's shift replaces it."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """Encoder of ``depth + 1`` double-conv stages, decoder of ``depth`` up-and-merge stages, 1x1 head."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        widths = [cfg.width * 2**i for i in range(cfg.depth + 1)]  # channels at side / 2**i
        self.down = nn.ModuleList(
            [_double_conv(cfg.in_channels, widths[0])]
            + [_double_conv(widths[i], widths[i + 1]) for i in range(cfg.depth)]
        )
        # Deepest first: up[j] and merge[j] bring side / 2**(depth-j) back to side / 2**(depth-j-1).
        levels = list(reversed(range(cfg.depth)))
        self.up = nn.ModuleList([nn.ConvTranspose2d(widths[i + 1], widths[i], kernel_size=2, stride=2) for i in levels])
        self.merge = nn.ModuleList([_double_conv(2 * widths[i], widths[i]) for i in levels])
        self.head = nn.Conv2d(widths[0], cfg.n_classes, kernel_size=1)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.cfg.in_channels:
            raise BandMismatchError(
                f"expected input (B, {self.cfg.in_channels}, H, W), got shape {tuple(x.shape)}; "
                "pass normalised tiles with the channels the U-Net was built for"
            )
        step = 2**self.cfg.depth
        if x.shape[-2] % step or x.shape[-1] % step:
            raise ValueError(
                f"tile side {tuple(x.shape[-2:])} is not a multiple of 2**depth = {step}; "
                f"crop or pad the tiles, or lower the U-Net depth"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        skips = []
        for i, stage in enumerate(self.down):
            x = stage(x if i == 0 else nn.functional.max_pool2d(x, 2))  # (B, width * 2**i, H / 2**i, W / 2**i)
            skips.append(x)
        skips.pop()  # the bottleneck is x itself, not a skip
        for up, merge in zip(self.up, self.merge):
            skip = skips.pop()
            x = up(x)  # (B, C, h, w): the skip's channels and side
            x = merge(torch.cat([x, skip], dim=1))  # (B, 2C, h, w) -> (B, C, h, w)
        return self.head(x)  # (B, K, H, W)
