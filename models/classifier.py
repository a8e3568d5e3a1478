"""Scene classifiers for method A: the 13-band MS teacher and the 3-band RGB student.

Both are the same ``SceneCNN`` built from a different band list; only the input layer
differs, so ``encode`` yields feature maps of one shape and the distillation loss can
compare them directly (docs/methods.md §A.4: "same data structure").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ms2rgb.models.bands import BandNormalize, check_bands

# Spatial side of the feature map handed to the distiller; fixed so that tiles of any
# size (multiple of 8) give teacher and student maps that line up.
FEATURE_SIDE = 8


@dataclass(frozen=True)
class SceneCNNConfig:
    """Architecture of a ``SceneCNN``."""

    bands: tuple[str, ...]  # input bands in channel order; sizes the first conv
    n_classes: int = 10  # scene classes (EuroSAT has 10)
    width: int = 32  # channels of the first stage; the feature map has 4*width
    from_8bit: bool = False  # inputs are 0..255 RGB renders rather than reflectance
    dropout: float = 0.1  # dropout before the linear head
    stem_stride: int = 1  # stride of the first conv; 2 quarters the cost of the full-resolution stage
    # Ground sample distance (m) of the training tiles: 10 m, the Sentinel-2 tiles every stage trains
    # on (tasks/data/geotiff.py PIXEL_SIZE), also for checkpoints saved before the field existed.
    pixel_size_m: float = 10.0


def _stage(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    """conv3x3-BN-ReLU; bias is dropped because BN's shift replaces it."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class SceneCNN(nn.Module):
    """Three conv stages and a linear head. On 64 px tiles the stages run at 64, 32, 16 px
    (then pooled to 8), or at 32, 16, 8 px with a stride-2 stem.

    ``encode`` returns a (B, 4*width, 8, 8) map whatever the band count, so a teacher
    and a student built with the same ``width`` are directly comparable.
    """

    def __init__(self, cfg: SceneCNNConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.bands = check_bands(cfg.bands)
        if cfg.stem_stride not in (1, 2):
            raise ValueError(f"stem_stride={cfg.stem_stride} is not supported; use 1 or 2")
        w = cfg.width
        self.normalize = BandNormalize(self.bands, from_8bit=cfg.from_8bit)
        self.features = nn.Sequential(
            _stage(len(self.bands), w, cfg.stem_stride),
            nn.MaxPool2d(2),
            _stage(w, 2 * w),
            nn.MaxPool2d(2),
            _stage(2 * w, 4 * w),
            # Adaptive rather than a third MaxPool so 32x32 or 128x128 tiles also give 8x8.
            nn.AdaptiveAvgPool2d(FEATURE_SIDE),
        )
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(cfg.dropout),
            nn.Linear(4 * w, cfg.n_classes),
        )
        # NHWC: oneDNN's convolutions run about 25 % faster on CPU in this layout than in NCHW
        # (bench/step_time.py); loaded state dicts are copied into it, so checkpoints stay layout-free.
        self.to(memory_format=torch.channels_last)

    @property
    def pixel_size_m(self) -> float:
        """Ground sample distance (m) of the tiles it was trained on."""
        return self.cfg.pixel_size_m

    @property
    def feature_channels(self) -> int:
        """Channels of the map returned by ``encode``."""
        return 4 * self.cfg.width

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, len(bands), H, W) tiles -> (B, 4*width, 8, 8) feature map."""
        if x.ndim == 4 and (x.shape[-1] % FEATURE_SIDE or x.shape[-2] % FEATURE_SIDE):
            raise ValueError(
                f"tile size {tuple(x.shape[-2:])} is not a multiple of {FEATURE_SIDE}; "
                "crop or resize tiles to e.g. 64x64"
            )
        return self.features(self.normalize(x).contiguous(memory_format=torch.channels_last))

    def classify(self, feat: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) feature map -> (B, n_classes) logits."""
        return self.head(feat)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.encode(x))
