"""A stand-in detector whose class map is set by the image (class 1 where red > 127, else 0), and
GeoTIFFs on a grid of any pixel size, for the tests of detect's outputs and pixel-size checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from helpers_rasters import CRS
from rasterio.transform import from_origin
from torch import nn

from ms2rgb.tasks.detection import detect as detect_module

ORIGIN = (600000.0, 5100000.0)


class RedDetector(nn.Module):
    """Logits (B, K, H, W): class 1 the red value, class 0 a constant 127.5, others far below.

    The logits of a pixel are the same in every window, so the window mean keeps them and the
    class map is exactly `red > 127`."""

    def __init__(self, pixel_size_m: float | None = 10.0) -> None:
        super().__init__()
        self.class_names, self.texts, self.clip_model = ["water", "forest"], ["water", "forest"], "none"
        self.pixel_size_m = pixel_size_m

    def logits_for(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        red = images[:, 0].float()
        logits = torch.full((images.shape[0], tokens.shape[0], *red.shape[1:]), -1e3)
        logits[:, 0], logits[:, 1] = 127.5, red
        return logits

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Its own classes (what `detect` calls when asked for exactly them)."""
        return self.logits_for(images, torch.zeros(len(self.class_names), 1))


def use_red_detector(monkeypatch: pytest.MonkeyPatch, pixel_size_m: float | None = 10.0) -> RedDetector:
    """Make `detect` use a RedDetector (no CLIP, no tokenizer)."""
    detector = RedDetector(pixel_size_m)
    monkeypatch.setattr(detect_module, "choose_detector", lambda root, uri: (detector, "red detector", None))
    monkeypatch.setattr(detect_module, "tokenizer_for", lambda model: lambda texts: torch.zeros(len(texts), 1))
    return detector


def red_image(path: Path, red: np.ndarray, pixel_m: float = 10.0, crs: str = CRS) -> Path:
    """A 3-band uint8 GeoTIFF whose red band is `red` (H, W), green and blue mid-grey."""
    grey = np.full_like(red, 100, dtype=np.uint8)
    data = np.stack([red.astype(np.uint8), grey, grey])
    step = pixel_m if crs == CRS else pixel_m / 111_000  # EPSG:4326: degrees
    origin = ORIGIN if crs == CRS else (12.0, 46.0)
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=red.shape[1],
        height=red.shape[0],
        count=3,
        dtype="uint8",
        crs=crs,
        transform=from_origin(*origin, step, step),
    ) as dst:
        dst.write(data)
    return path


def save_tiny_student(root: Path) -> Path:
    """A random 4-channel-wide RGB SceneCNN saved as the student stage saves it (10 m recorded)."""
    from ms2rgb.models.bands import RGB_BANDS
    from ms2rgb.models.classifier import SceneCNN, SceneCNNConfig
    from ms2rgb.tasks.data.artifacts import model_path
    from ms2rgb.tasks.training.store import save_model

    torch.manual_seed(0)
    cfg = SceneCNNConfig(bands=RGB_BANDS, from_8bit=True, width=4, dropout=0.0)
    return save_model(model_path(root, "student"), "scene_cnn", SceneCNN(cfg).eval(), cfg)
