"""A small SceneCNN trained by fit_classifier (or, with `--tune`, the prompts of a detector on the tiny
random CLIP), run alone (`python helpers_ddp.py OUT`) or by each process of
`torchrun --nproc_per_node 2 helpers_ddp.py OUT` (tests/test_distributed.py).

Dropout is off: each process draws its own dropout mask, which no split of one process's draws
reproduces; everything else (seeded order, flips of the whole batch, batch norm over the whole
batch) is what one process computes. `--stop-after E` ends the run after epoch E as a kill would
(its checkpoint written); `--checkpoints DIR` keeps checkpoints there.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from ms2rgb.models.classifier import SceneCNN, SceneCNNConfig
from ms2rgb.tasks.training import distributed
from ms2rgb.tasks.training.loop import (
    EpochStats,
    FitConfig,
    Trainer,
    fit_classifier,
    make_deterministic,
    seed_everything,
)

TILES, CLASSES, SIDE = 96, 4, 16
FIT = FitConfig(epochs=4, batch_size=30, lr=0.01, weight_decay=1e-4)  # 4 batches an epoch, the last of 6 tiles


class Stopped(Exception):
    """Ends a run after --stop-after epochs, as a kill between two epochs would."""


def tiles(count: int = TILES) -> tuple[np.ndarray, np.ndarray]:
    """Seeded RGB tiles whose class sets their mean colour, so training has something to learn."""
    rng = np.random.default_rng(7)
    labels = rng.integers(0, CLASSES, count)
    images = rng.integers(0, 160, (count, 3, SIDE, SIDE)) + 24 * labels[:, None, None, None]
    return images.astype(np.uint8), labels.astype(np.int64)


def tune_prompts(out: Path) -> None:
    """The coupled prompts tuned for 6 steps of 5 tiles (slices of 3 and 2) by focal + dice."""
    from helpers_params import config

    from ms2rgb.models.clip_backbone import TINY_MODEL, load_clip
    from ms2rgb.models.clip_detector import ClassMapDetector
    from ms2rgb.models.clip_prompt import PromptConfig, PromptedCLIP
    from ms2rgb.tasks.data.classes import SURFACE_CLASSES, SURFACE_NAMES
    from ms2rgb.tasks.detection.tune import tune

    torch.manual_seed(0)
    clip, tokenizer, _ = load_clip(TINY_MODEL, None)
    prompted = PromptedCLIP(clip, PromptConfig(n_ctx=2, depth=2, similarity_layers=(2, 3), mode="coupled"))
    texts = list(SURFACE_CLASSES.values())
    detector = ClassMapDetector(prompted, tokenizer(texts), SURFACE_NAMES, texts, TINY_MODEL)
    gen = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (8, 3, 64, 64), generator=gen, dtype=torch.uint8)
    masks = torch.randint(0, len(SURFACE_NAMES), (8, 64, 64), generator=gen, dtype=torch.uint8)
    masks[:, :4] = 255  # no-data rows count nowhere
    masks[1] = 255  # one tile with no labelled pixel: its process still joins the sums
    cfg = config("detector.tune", max_steps=6, batch_size=5, loss_threshold=0.0, checkpoint_every=100)
    result = tune(detector, images, masks, cfg, seed=1, device=torch.device("cpu"))
    if distributed.is_writer():
        torch.save({"state": detector.tuned_state_dict(), "losses": result.losses}, out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--checkpoints", type=Path)
    parser.add_argument("--stop-after", type=int, default=0)
    parser.add_argument("--tune", action="store_true")
    parser.add_argument("--tiles", type=int, default=TILES)  # 91: a last batch of one tile
    args = parser.parse_args()
    make_deterministic(1)
    distributed.join(torch.device("cpu"))
    if args.tune:
        try:
            return tune_prompts(args.out)
        finally:
            distributed.leave()
    images, labels = tiles(args.tiles)
    seed_everything(0)
    model = SceneCNN(
        SceneCNNConfig(bands=("B04", "B03", "B02"), n_classes=CLASSES, width=4, from_8bit=True, dropout=0.0)
    )

    def stop(trainer: Trainer, stats: EpochStats) -> None:
        if stats.epoch + 1 == args.stop_after:
            raise Stopped

    try:
        history = fit_classifier(
            model, images, labels, FIT, seed=3, on_epoch=stop, augment=True, checkpoint_dir=args.checkpoints
        )
    except Stopped:
        return
    finally:
        distributed.leave()
    if distributed.is_writer():
        torch.save({"state": model.state_dict(), "losses": [h.loss for h in history]}, args.out)


if __name__ == "__main__":
    main()
