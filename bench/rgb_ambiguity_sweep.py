"""How `synth.rgb_ambiguity` sets the information gap: MS vs RGB accuracy of one small CNN.

Renders locations in memory (no files, no GDAL: runs on bare GPU hosts too), trains SceneCNN
on the 13 bands and on the RGB render of the same tiles, and prints test accuracy per setting.
Usage: python bench/rgb_ambiguity_sweep.py --ambiguity 0,0.3,0.6,0.9 --epochs 20
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from ms2rgb.models.bands import RGB_BANDS, S2_BANDS
from ms2rgb.models.classifier import SceneCNN, SceneCNNConfig
from ms2rgb.tasks.config import SynthConfig, load_params
from ms2rgb.tasks.data.classes import SCENE_NAMES
from ms2rgb.tasks.data.render import render_rgb
from ms2rgb.tasks.data.sources.spectra import surface_spectra
from ms2rgb.tasks.data.sources.synth_scene import render_location
from ms2rgb.tasks.training.inference import predict_logits
from ms2rgb.tasks.training.loop import FitConfig, fit_classifier
from ms2rgb.tasks.training.metrics import accuracy_report


def draw(cfg: SynthConfig, split_no: int, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, 13, 64, 64) MS tiles and labels, seeded like `generate` in `tasks/data/sources/synth.py`."""
    spectra = surface_spectra(cfg.rgb_ambiguity)
    tiles, labels = [], []
    for class_no, name in enumerate(SCENE_NAMES):
        for k in range(per_class):
            ms, _ = render_location(np.random.default_rng([0, split_no, class_no, k]), name, spectra, cfg)
            tiles.append(ms)
            labels.append(class_no)
    return np.stack(tiles), np.array(labels)


def accuracy(
    bands: tuple[str, ...],
    train: np.ndarray,
    y_train: np.ndarray,
    test: np.ndarray,
    y_test: np.ndarray,
    epochs: int,
    width: int,
) -> float:
    model = SceneCNN(SceneCNNConfig(bands=bands, from_8bit=bands == RGB_BANDS, width=width))
    fit_classifier(model, train, y_train, FitConfig(epochs=epochs, batch_size=64, lr=2e-3, weight_decay=1e-4), seed=0)
    return accuracy_report(predict_logits(model, test), y_test, SCENE_NAMES)["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", default=".", help="project root holding params.yaml")
    parser.add_argument("--ambiguity", default="0,0.3,0.6,0.9")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--train-per-class", type=int, default=60)
    parser.add_argument("--test-per-class", type=int, default=30)
    args = parser.parse_args()
    base = load_params(Path(args.root)).synth
    print("ambiguity  MS_acc  RGB_acc  gap_points  seconds")
    for value in (float(v) for v in args.ambiguity.split(",")):
        start = time.perf_counter()
        cfg = base.model_copy(update={"rgb_ambiguity": value})
        train, y_train = draw(cfg, 0, args.train_per_class)
        test, y_test = draw(cfg, 1, args.test_per_class)
        ms = accuracy(S2_BANDS, train, y_train, test, y_test, args.epochs, args.width)
        rgb_of = lambda tiles: np.stack([render_rgb(t) for t in tiles])
        rgb = accuracy(RGB_BANDS, rgb_of(train), y_train, rgb_of(test), y_test, args.epochs, args.width)
        print(f"{value:9.2f}  {ms:6.3f}  {rgb:7.3f}  {100 * (ms - rgb):10.1f}  {time.perf_counter() - start:7.0f}")


if __name__ == "__main__":
    main()
