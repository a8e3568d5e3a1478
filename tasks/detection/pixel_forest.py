"""Method B's per-pixel random forest baseline: what a remote-sensing user fits first on a few labelled tiles.

Every labelled pixel of the shots is a sample. Its features are its RGB value, for each window side
w the w x w mean and standard deviation of each band around it (texture: a roof and concrete of one
colour differ in how much they vary), and the gradient magnitude of the brightness (edges). Windows
shrink at the tile border to the pixels inside it. A seeded uniform sample of at most ``max_pixels``
labelled pixels trains a scikit-learn ``RandomForestClassifier``; ignored pixels (255) never do.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sklearn.ensemble import RandomForestClassifier

from ms2rgb.models.pixel_evidence import pixel_features as local_features
from ms2rgb.tasks.config import PixelForestConfig
from ms2rgb.tasks.data.classes import MASK_NODATA
from ms2rgb.tasks.errors import Ms2rgbError


def feature_names(windows: Sequence[int]) -> list[str]:
    """Names of the columns :func:`pixel_features` returns, in order."""
    bands = ("r", "g", "b")
    local = [f"{stat}{w}_{b}" for w in windows for stat in ("mean", "std") for b in bands]
    return [*bands, *local, "gradient"]


@torch.no_grad()
def pixel_features(images: torch.Tensor, windows: Sequence[int]) -> np.ndarray:
    """(N*H*W, F) float32 features of uint8 tiles (N, 3, H, W), pixels in row-major tile order."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise Ms2rgbError(f"the pixel forest takes RGB tiles (N, 3, H, W); got shape {tuple(images.shape)}")
    x = images.float()  # (N, 3, H, W), 0..255
    grey = x.mean(1)  # (N, H, W)
    dy, dx = torch.gradient(grey, dim=(1, 2))
    gradient = torch.sqrt(dx * dx + dy * dy).unsqueeze(1)  # (N, 1, H, W)
    # RGB and local statistics are those of the detector's pixel evidence, plus the edge strength.
    columns = [local_features(x, windows), gradient]
    stacked = torch.cat(columns, dim=1)  # (N, F, H, W)
    return stacked.permute(0, 2, 3, 1).reshape(-1, stacked.shape[1]).numpy()  # (N*H*W, F)


def sample_pixels(masks: torch.Tensor, max_pixels: int, seed: int) -> np.ndarray:
    """Sorted flat indices of at most ``max_pixels`` labelled pixels, drawn uniformly with ``seed``."""
    labelled = np.flatnonzero(masks.numpy().reshape(-1) != MASK_NODATA)  # (N*H*W,) -> labelled positions
    if len(labelled) == 0:
        raise Ms2rgbError("the few-shot masks hold no labelled pixel (all 255): the pixel forest has nothing to fit")
    if len(labelled) <= max_pixels:
        return labelled
    return np.sort(np.random.default_rng(seed).choice(labelled, size=max_pixels, replace=False))


def fit_pixel_forest(
    images: torch.Tensor, masks: torch.Tensor, cfg: PixelForestConfig, seed: int, threads: int
) -> RandomForestClassifier:
    """A forest fitted on the shots (images uint8 (N, 3, H, W), masks uint8 (N, H, W), 255 ignored).

    The forest is deterministic for a seed whatever ``threads`` (each tree's seed is drawn up front).
    """
    rows = sample_pixels(masks, cfg.max_pixels, seed)
    features = pixel_features(images, cfg.windows)[rows]  # (P, F)
    labels = masks.numpy().reshape(-1)[rows]  # (P,)
    forest = RandomForestClassifier(n_estimators=cfg.trees, max_depth=cfg.max_depth, n_jobs=threads, random_state=seed)
    return forest.fit(features, labels)


def node_count(forest: RandomForestClassifier) -> int:
    """Split and leaf nodes over all trees: the forest's counterpart of a trainable-parameter count."""
    return int(sum(tree.tree_.node_count for tree in forest.estimators_))


def predict_pixel_forest(
    forest: RandomForestClassifier, images: torch.Tensor, windows: Sequence[int], batch_size: int = 100
) -> np.ndarray:
    """Class maps (N, H, W) uint8 of uint8 tiles, ``batch_size`` tiles at a time (4 B per feature and pixel)."""
    n, _, h, w = images.shape
    out = np.empty((n, h, w), dtype=np.uint8)
    for i in range(0, n, batch_size):
        batch = images[i : i + batch_size]
        out[i : i + len(batch)] = forest.predict(pixel_features(batch, windows)).reshape(len(batch), h, w)
    return out
