"""Epoch throughput: the memory-mapped prepared cache vs. reading each GeoTIFF per item.

Same tiles both ways (the MS training split), same batch size, same random order.
Usage: python bench/data_loading.py [--root .] [--split ms_train] [--epochs 3]
Needs a prepared project (`ms2rgb stage prepare` or `make run`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ms2rgb.tasks.config import load_params
from ms2rgb.tasks.data.cache import open_split
from ms2rgb.tasks.data.geotiff import read_tile


def epoch_from_cache(images: np.ndarray, order: np.ndarray, batch: int) -> float:
    total = 0.0
    for start in range(0, len(order), batch):
        idx = np.sort(order[start : start + batch])  # sorted fancy index = sequential reads in the memmap
        total += float(torch.from_numpy(images[idx].astype(np.float32)).mean())
    return total


def epoch_from_files(paths: list[Path], order: np.ndarray, batch: int) -> float:
    total = 0.0
    for start in range(0, len(order), batch):
        arrays = [read_tile(paths[i]) for i in order[start : start + batch]]
        total += float(torch.from_numpy(np.stack(arrays).astype(np.float32)).mean())
    return total


def timed(fn, epochs: int) -> float:
    """Tiles per second over `epochs` epochs, after one warm-up epoch (page cache warm for both)."""
    fn()
    start = time.perf_counter()
    for _ in range(epochs):
        fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", default=".")
    parser.add_argument("--split", default="ms_train")
    parser.add_argument("--modality", default="ms")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    root = Path(args.root)
    prepared = root / load_params(root)["data"]["prepared_dir"]
    cached = open_split(prepared, args.split, args.modality)
    index = pd.read_parquet(prepared / "manifest.parquet").set_index("id")
    paths = [root / index.loc[i, "path"] for i in cached.ids]
    order = np.random.default_rng(0).permutation(len(paths))
    n = len(paths) * args.epochs
    t_cache = timed(lambda: epoch_from_cache(cached.images, order, args.batch), args.epochs)
    t_files = timed(lambda: epoch_from_files(paths, order, args.batch), args.epochs)
    print(f"tiles: {len(paths)} ({args.split}/{args.modality}), epochs: {args.epochs}, batch: {args.batch}")
    print(f"prepared cache (memmap): {n / t_cache:10.0f} tiles/s")
    print(f"GeoTIFF per item:        {n / t_files:10.0f} tiles/s")
    print(f"speed-up: {t_files / t_cache:.1f}x")


if __name__ == "__main__":
    main()
