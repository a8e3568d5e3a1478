"""Method B's baselines without CLIP on the prepared splits: mIoU, train seconds and cost per seed.

Trains on the detector's K-shot tiles (the largest K of `detector.shots`, as the stage does) and
scores on seg_test, with the params.yaml settings and any `--set` overrides of
`detector.baselines`, e.g. `--set unet.steps=300 --set pixel_forest.windows=[5]`.
Usage: python bench/baselines.py [--root .] [--seeds 2] [--only unet] [--set KEY=VALUE ...]
Needs a prepared project (`ms2rgb stage prepare` or `make run`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import yaml

from ms2rgb.tasks.config import load_params
from ms2rgb.tasks.data.cache import open_split
from ms2rgb.tasks.data.legend import read_legend
from ms2rgb.tasks.detection.baselines import BASELINE_RUNNERS, run_baseline
from ms2rgb.tasks.detection.data import first_k_per_class, load_tiles
from ms2rgb.tasks.training.loop import make_deterministic, pick_device


def with_overrides(settings, overrides: list[str]):
    """`detector.baselines` with `name.key=value` overrides (values parsed as YAML)."""
    raw = settings.baselines.model_dump()
    for item in overrides:
        dotted, value = item.split("=", 1)
        name, key = dotted.split(".")
        raw[name][key] = yaml.safe_load(value)
    baselines = type(settings.baselines).model_validate(raw, strict=False)
    return settings.model_copy(update={"baselines": baselines})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("."))
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--only", choices=sorted(BASELINE_RUNNERS), action="append")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    params = load_params(args.root)
    make_deterministic(params.threads)
    settings = with_overrides(params.detector, args.overrides)
    prepared = args.root / params.data.prepared_dir
    names = list(read_legend(prepared))
    fewshot = open_split(prepared, "fewshot", "rgb", masks=True)
    train = load_tiles(fewshot, first_k_per_class(fewshot, max(settings.shots)))
    test = load_tiles(open_split(prepared, "seg_test", "rgb", masks=True))
    device = pick_device()
    sizes = f"{len(train[0])} shot tiles, {len(test[0])} test tiles, {len(names)} classes"
    print(f"{sizes}, {device}, {params.threads} threads")
    for name in args.only or sorted(BASELINE_RUNNERS):
        print(f"{name}: {getattr(settings.baselines, name)}", flush=True)
        mious = []
        for seed in range(params.seed, params.seed + args.seeds):
            start = time.perf_counter()
            r = run_baseline(name, train, test, names, settings, seed, device, params.threads)
            mious.append(r.scores["miou"])
            print(
                f"  seed {seed}: mIoU {r.scores['miou']:.4f}  pixel acc {r.scores['pixel_accuracy']:.4f}  "
                f"train {r.train_seconds:.1f} s  total {time.perf_counter() - start:.1f} s  "
                f"{r.scores['tiles_per_second']:.0f} tiles/s  params {r.trainable_params}  "
                f"peak {r.peak_memory_mb if r.peak_memory_mb is None else round(r.peak_memory_mb)} MB"
                + (f"  loss {r.losses[0]:.3f} -> {np.mean(r.losses[-10:]):.3f}" if r.losses else ""),
                flush=True,
            )
        print(f"  mean mIoU {np.mean(mious):.4f} (std {np.std(mious, ddof=1) if len(mious) > 1 else 0:.4f})")


if __name__ == "__main__":
    main()
