"""Is the RGB student limited by what RGB shows, or by how many RGB tiles it sees?

Usage: python bench/student_data_limit.py [--root .] [--seeds 3]
Needs a prepared project on which the pairs stage has run. Trains the `rgb_only` baseline of the
student stage (same architecture and optimiser) three times per seed: on `rgb_train`; on
`rgb_train` plus the RGB renders of the `ms_train` and `ms_pool` tiles (other locations, rendered
exactly as the data model renders RGB); and on `rgb_train` alone with as many optimiser steps as
the larger set got, which separates "more tiles" from "more steps". A large gain means more RGB tiles would lift the
student, which is headroom that distillation from unpaired MS tiles can only partly reach:
those tiles never show the student their RGB look.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ms2rgb.tasks.config import StudentConfig, load_params
from ms2rgb.tasks.data.cache import open_split
from ms2rgb.tasks.data.classes import SCENE_NAMES
from ms2rgb.tasks.data.render import render_rgb
from ms2rgb.tasks.student import StudentInputs, student_arch
from ms2rgb.tasks.training.distill import VARIANTS, StudentSet, train_student
from ms2rgb.tasks.training.inference import predict_logits
from ms2rgb.tasks.training.metrics import accuracy_report

EXTRA_SPLITS = ("ms_train", "ms_pool")


def rendered(prepared: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """RGB renders (N, 3, H, W) uint8 and labels of a split's MS tiles."""
    ms = open_split(prepared, split, "ms")
    return np.stack([render_rgb(tile) for tile in np.asarray(ms.images)]), np.asarray(ms.labels)


def accuracy(inputs: StudentInputs, data: StudentSet, cfg: StudentConfig, seed: int, epochs: int) -> float:
    rgb_only = next(v for v in VARIANTS if v.name == "rgb_only")
    run = train_student(rgb_only, data, cfg, student_arch(inputs.teacher.cfg), seed, epochs)
    return accuracy_report(predict_logits(run.model, inputs.test.images), inputs.test.labels, SCENE_NAMES)["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=".")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    root = Path(args.root).resolve()
    params = load_params(root)
    cfg, seed = params.student, params.seed
    inputs = StudentInputs(root, params)
    extra = [rendered(root / params.data.prepared_dir, split) for split in EXTRA_SPLITS]
    own = StudentSet(inputs.rgb_images, inputs.rgb.labels, None, None)
    more = StudentSet(
        np.concatenate([inputs.rgb_images, *(x for x, _ in extra)]),
        np.concatenate([inputs.rgb.labels, *(y for _, y in extra)]),
        None,
        None,
    )
    same_steps = round(cfg.epochs * len(more.labels) / len(own.labels))
    for name, data, epochs in (
        ("rgb_train", own, cfg.epochs),
        ("rgb_train + rendered MS tiles", more, cfg.epochs),
        ("rgb_train, the larger set's steps", own, same_steps),
    ):
        accs = np.array([accuracy(inputs, data, cfg, seed + k, epochs) for k in range(args.seeds)])
        print(
            f"rgb_only on {name:34s} ({len(data.labels):5d} tiles, {epochs:3d} epochs): RGB test accuracy "
            f"{accs.mean():.3f} +- {accs.std(ddof=1) if len(accs) > 1 else 0.0:.3f}  per seed "
            f"{' '.join(f'{a:.3f}' for a in accs)}",
            flush=True,
        )


if __name__ == "__main__":
    main()
