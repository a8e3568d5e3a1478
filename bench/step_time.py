"""Optimiser-step time of the student, NCHW against NHWC (channels_last), on the embedded default's shapes.

Why it exists: SceneCNN keeps its weights and activations in NHWC because oneDNN's convolutions run
faster on CPU in that layout. This script is the measurement behind that choice; run it after a
torch upgrade or on another CPU to see whether it still holds.

    .venv/bin/python bench/step_time.py [--steps 40] [--batch 64]

Prints the median step time (ms) of an rgb_only step (cross-entropy) and a full-method step
(feature loss + KD + CE) in each layout. No data or run needed: random tiles of the default shape.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ms2rgb.models.classifier import SceneCNN, SceneCNNConfig
from ms2rgb.models.distill import DistillLoss
from ms2rgb.tasks.config import Params, load_params
from ms2rgb.tasks.training.loop import seed_everything


def median_ms(step: Callable[[], None], steps: int) -> float:
    for _ in range(5):  # warm-up: oneDNN picks its kernels on the first calls
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def student(nhwc: bool, width: int) -> SceneCNN:
    seed_everything(0)
    model = SceneCNN(SceneCNNConfig(bands=("B04", "B03", "B02"), width=width, from_8bit=True, stem_stride=2))
    # SceneCNN is NHWC by construction; converting back measures what NCHW would cost.
    return model if nhwc else model.to(memory_format=torch.contiguous_format)


def time_layout(nhwc: bool, params: Params, batch: int, steps: int) -> tuple[float, float]:
    """Median ms of an rgb_only and a full-method step in one memory layout."""
    width, cfg = params.teacher.width, params.student
    x = torch.rand(batch, 3, 64, 64) * 255  # (B, 3, H, W) RGB 0..255
    inputs = x.contiguous(memory_format=torch.channels_last) if nhwc else x
    y = torch.randint(0, 10, (batch,))
    t_feat, t_logits = torch.randn(batch, 4 * width, 8, 8), torch.randn(batch, 10)
    model = student(nhwc, width)
    loss = DistillLoss(4 * width, cfg.w_feat, cfg.w_kd, cfg.w_ce, cfg.temperature, cfg.heads)
    opt = torch.optim.AdamW([*model.parameters(), *loss.parameters()], lr=cfg.lr)

    def rgb_only() -> None:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model.classify(model.features(model.normalize(inputs))), y).backward()
        opt.step()

    def full_method() -> None:
        opt.zero_grad()
        feat = model.features(model.normalize(inputs))  # (B, 4*width, 8, 8)
        loss(feat, t_feat, model.classify(feat), t_logits, y, torch.ones(batch)).total.backward()
        opt.step()

    return median_ms(rgb_only, steps), median_ms(full_method, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    params = load_params(Path("."))
    torch.set_num_threads(params.threads)
    for nhwc in (False, True):
        rgb_only, full_method = time_layout(nhwc, params, args.batch, args.steps)
        layout = "NHWC" if nhwc else "NCHW"
        print(f"{layout}: rgb_only {rgb_only:.1f} ms/step, full_method {full_method:.1f} ms/step", flush=True)


if __name__ == "__main__":
    main()
