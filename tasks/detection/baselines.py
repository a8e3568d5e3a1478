"""Method B's baselines without CLIP, trained on the same K-shot tiles and scored like the detector (issue 23).

- ``pixel_forest``: a per-pixel random forest on RGB and local texture (``pixel_forest.py``);
- ``unet``: a small U-Net from scratch, trained like the prompts (``unet_baseline.py``);
- ``max_likelihood``: the classic Gaussian maximum-likelihood classifier per pixel
  (``models/pixel_evidence.py``, the detector's pixel features), without the CLIP;
- ``pixel_mlp``: the detector's default pixel evidence alone (a per-pixel network on the same
  features), without the CLIP: what the CLIP adds to it is the method's row minus this one.

Each runner fits on the shots, predicts the test tiles and returns a :class:`BaselineResult` whose
``scores`` have the keys ``tune.evaluate`` returns (``miou``, ``pixel_accuracy``, ``per_class_iou``,
``tiles_per_second``) and whose cost (train seconds, trainable parameters, peak memory) is measured
the same way for both. ``as_run`` gives the per-seed dict the detector stage aggregates.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from ms2rgb.models.pixel_evidence import PixelEvidence, PixelGaussians, PixelMLP
from ms2rgb.tasks.config import DetectorConfig, PixelEvidenceConfig
from ms2rgb.tasks.data.classes import MASK_NODATA
from ms2rgb.tasks.detection.pixel_forest import fit_pixel_forest, node_count, predict_pixel_forest
from ms2rgb.tasks.detection.unet_baseline import build_unet, predict_unet, train_unet
from ms2rgb.tasks.errors import Ms2rgbError, ParamsError
from ms2rgb.tasks.training.memory import PeakMemory
from ms2rgb.tasks.training.metrics import confusion_matrix, iou_report

Tiles = tuple[torch.Tensor, torch.Tensor]  # (images uint8 (N, 3, H, W), masks uint8 (N, H, W), 255 ignored)
CPU = torch.device("cpu")


@dataclass
class BaselineResult:
    """One seed of one baseline: its scores on the test tiles, its maps and what training cost."""

    scores: dict[str, Any]  # iou_report (miou, pixel_accuracy, per_class_iou) + tiles_per_second
    preds: np.ndarray  # (N, H, W) uint8 class maps of the test tiles
    train_seconds: float  # wall time of the fit (the forest's feature extraction included)
    trainable_params: int  # U-Net: weights; forest: tree nodes (splits + leaves) over all trees
    peak_memory_mb: float | None  # what training added at its peak (tasks/training/memory.py); None: unmeasurable
    losses: list[float]  # training loss per step (U-Net); empty for the forest

    def as_run(self, seed: int) -> dict[str, Any]:
        """The per-seed dict the detector stage builds for a tuned variant (scores, maps, cost, curve)."""
        return {
            "seed": seed,
            **self.scores,
            "preds": self.preds,
            "train_seconds": self.train_seconds,
            "trainable_params": self.trainable_params,
            "peak_memory_mb": self.peak_memory_mb,
            "losses": self.losses,
            "steps": len(self.losses) or None,
            "stopped_by": "max_steps" if self.losses else None,
        }


def score(pred: np.ndarray, masks: torch.Tensor, class_names: Sequence[str], seconds: float) -> dict[str, Any]:
    """The IoU report of class maps against masks (255 ignored) plus the tiles per second of ``seconds``."""
    conf = confusion_matrix(masks.numpy(), pred, len(class_names), ignore_index=MASK_NODATA)
    report = iou_report(conf, class_names)
    report["tiles_per_second"] = round(len(pred) / max(seconds, 1e-9), 1)
    return report


class Runner(Protocol):
    def __call__(
        self,
        train: Tiles,
        test: Tiles,
        class_names: Sequence[str],
        settings: DetectorConfig,
        seed: int,
        device: torch.device,
        threads: int,
        on_step: Callable[[int, float], None] | None = None,
    ) -> BaselineResult: ...


def run_pixel_forest(
    train: Tiles,
    test: Tiles,
    class_names: Sequence[str],
    settings: DetectorConfig,
    seed: int,
    device: torch.device,
    threads: int,
    on_step: Callable[[int, float], None] | None = None,
) -> BaselineResult:
    """Fit the forest on ``train`` with ``threads`` jobs (always on CPU: ``device`` and ``on_step`` unused)."""
    cfg = settings.baselines.pixel_forest
    start = time.perf_counter()
    with PeakMemory(CPU) as memory:
        forest = fit_pixel_forest(*train, cfg, seed, threads)
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    pred = predict_pixel_forest(forest, test[0], cfg.windows, settings.eval_batch_size)
    scores = score(pred, test[1], class_names, time.perf_counter() - start)
    return BaselineResult(scores, pred, train_seconds, node_count(forest), memory.mb, [])


def run_unet(
    train: Tiles,
    test: Tiles,
    class_names: Sequence[str],
    settings: DetectorConfig,
    seed: int,
    device: torch.device,
    threads: int,
    on_step: Callable[[int, float], None] | None = None,
) -> BaselineResult:
    """Train a fresh U-Net on ``train`` on ``device`` (torch's thread count is the caller's: ``threads`` unused)."""
    cfg = settings.baselines.unet
    model = build_unet(len(class_names), cfg, seed)
    start = time.perf_counter()
    with PeakMemory(device) as memory:
        losses = train_unet(model, *train, cfg, seed, device, settings.tune.focal_gamma, on_step)
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    pred = predict_unet(model, test[0], device, settings.eval_batch_size)  # .cpu() waits for the device
    scores = score(pred, test[1], class_names, time.perf_counter() - start)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return BaselineResult(scores, pred, train_seconds, trainable, memory.mb, losses)


def _evidence_settings(settings: DetectorConfig, name: str) -> PixelEvidenceConfig:
    if settings.pixel_evidence is None:
        raise ParamsError(
            "detector.pixel_evidence", None, f"the {name} baseline uses its windows and fitting settings; set them"
        )
    return settings.pixel_evidence


def fit_pixel_expert(
    cfg: PixelEvidenceConfig, model: str, n_classes: int, images: torch.Tensor, masks: torch.Tensor, seed: int
) -> PixelEvidence:
    """The pixel expert ``model`` ("mlp" or "gaussian") with ``cfg``'s settings, fitted on these tiles."""
    if model == "mlp":
        return PixelMLP(cfg.windows, n_classes, cfg.hidden).fit(images, masks, steps=cfg.steps, lr=cfg.lr, seed=seed)
    return PixelGaussians(cfg.windows, n_classes).fit(images, masks, ridge=cfg.ridge)


def _evidence_alone(
    fit: Callable[[], PixelEvidence], test: Tiles, class_names: Sequence[str], settings: DetectorConfig
) -> BaselineResult:
    """Fit a pixel expert, then give each test pixel its best-scoring class."""
    start = time.perf_counter()
    with PeakMemory(CPU) as memory:
        evidence = fit()
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad():
        step = settings.eval_batch_size
        maps = torch.cat([evidence(test[0][i : i + step]).argmax(dim=1) for i in range(0, len(test[0]), step)])
    pred = maps.to(torch.uint8).numpy()
    scores = score(pred, test[1], class_names, time.perf_counter() - start)
    fitted = sum(b.numel() for b in evidence.buffers()) + sum(p.numel() for p in evidence.parameters())
    return BaselineResult(scores, pred, train_seconds, fitted, memory.mb, [])


def run_max_likelihood(
    train: Tiles,
    test: Tiles,
    class_names: Sequence[str],
    settings: DetectorConfig,
    seed: int,
    device: torch.device,
    threads: int,
    on_step: Callable[[int, float], None] | None = None,
) -> BaselineResult:
    """Fit one Gaussian per class on the shots' pixels (closed form: the seed, device and steps are unused)
    and give each test pixel its most likely class."""
    cfg = _evidence_settings(settings, "max_likelihood")
    expert = lambda: fit_pixel_expert(cfg, "gaussian", len(class_names), *train, seed)
    return _evidence_alone(expert, test, class_names, settings)


def run_pixel_mlp(
    train: Tiles,
    test: Tiles,
    class_names: Sequence[str],
    settings: DetectorConfig,
    seed: int,
    device: torch.device,
    threads: int,
    on_step: Callable[[int, float], None] | None = None,
) -> BaselineResult:
    """Train the per-pixel network of ``detector.pixel_evidence`` on the shots (CPU, seeded) and map with it alone."""
    cfg = _evidence_settings(settings, "pixel_mlp")
    expert = lambda: fit_pixel_expert(cfg, "mlp", len(class_names), *train, seed)
    return _evidence_alone(expert, test, class_names, settings)


BASELINE_RUNNERS: dict[str, Runner] = {
    "pixel_forest": run_pixel_forest,
    "unet": run_unet,
    "max_likelihood": run_max_likelihood,
    "pixel_mlp": run_pixel_mlp,
}


def run_baseline(
    name: str,
    train: Tiles,
    test: Tiles,
    class_names: Sequence[str],
    settings: DetectorConfig,
    seed: int,
    device: torch.device,
    threads: int,
    on_step: Callable[[int, float], None] | None = None,
) -> BaselineResult:
    """Fit the baseline called ``name`` on the shots and score it on the test tiles."""
    if name not in BASELINE_RUNNERS:
        raise Ms2rgbError(f"unknown baseline {name!r}; valid names are {sorted(BASELINE_RUNNERS)}")
    return BASELINE_RUNNERS[name](train, test, class_names, settings, seed, device, threads, on_step)
