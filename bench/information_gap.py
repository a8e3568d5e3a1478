"""The data's information gap: the same small CNN trained on MS vs on RGB renders of the same tiles.

Usage: python bench/information_gap.py [--root .] [--epochs 15]
Trains SceneCNN on ms_train (13 bands) and on the RGB render of exactly those tiles, tests on
the `test` split of each modality, prints both accuracies and the gap in points.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from ms2rgb.models.bands import RGB_BANDS, S2_BANDS
from ms2rgb.models.classifier import SceneCNN, SceneCNNConfig
from ms2rgb.tasks.config import load_params
from ms2rgb.tasks.data.cache import open_split
from ms2rgb.tasks.data.classes import SCENE_NAMES
from ms2rgb.tasks.data.render import render_rgb
from ms2rgb.tasks.training.inference import predict_logits
from ms2rgb.tasks.training.loop import FitConfig, fit_classifier
from ms2rgb.tasks.training.metrics import accuracy_report


def rgb_of(ms: np.ndarray) -> np.ndarray:
    return np.stack([render_rgb(tile) for tile in ms])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", default=".")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    prepared = Path(args.root) / load_params(Path(args.root))["data"]["prepared_dir"]
    train, test = open_split(prepared, "ms_train", "ms"), open_split(prepared, "test", "ms")
    fit = FitConfig(epochs=args.epochs, batch_size=64, lr=2e-3, weight_decay=1e-4)
    results = {}
    for name, bands, to_input, from_8bit in (("MS", S2_BANDS, np.asarray, False), ("RGB", RGB_BANDS, rgb_of, True)):
        start = time.perf_counter()
        model = SceneCNN(SceneCNNConfig(bands=bands, from_8bit=from_8bit))
        fit_classifier(model, to_input(train.images), train.labels, fit, args.seed)
        report = accuracy_report(predict_logits(model, to_input(test.images)), test.labels, SCENE_NAMES)
        results[name] = report["accuracy"]
        worst = sorted(report["per_class"].items(), key=lambda kv: kv[1])[:3]
        print(
            f"{name:3s}: test accuracy {report['accuracy']:.3f} ({time.perf_counter() - start:.0f} s); "
            f"weakest classes {[(k, round(v, 2)) for k, v in worst]}"
        )
    print(
        f"gap: {100 * (results['MS'] - results['RGB']):.1f} points "
        f"(train {len(train.labels)} tiles, test {len(test.labels)} tiles, seed {args.seed})"
    )


if __name__ == "__main__":
    main()
