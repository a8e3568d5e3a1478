"""Regenerate the committed EuroSAT_MS sample from a EuroSAT_MS folder (see README.md here).

    .venv/bin/python tests/data/eurosat_sample/make_sample.py /path/to/EuroSAT_MS

Takes tiles <Class>_1 .. <Class>_<per-class> of each of the 10 classes and keeps every `step`-th pixel of
each row and column (pixel (i, j) of the sample is pixel (step*i + OFFSET, step*j + OFFSET) of the tile):
the values are the genuine uint16 L1C values, the 13 bands stay in the file's own order (B8A last), the
CRS is the tile's and the geotransform is the tile's with `step` times larger pixels, so the sample
covers the tile's whole footprint. A 64 px tile, 106 KB raw and ~65 KB deflated, becomes ~5 KB.
Why decimate rather than crop a window: the sample shows the whole scene (a River tile keeps its river),
and upsampling it by `step` (nearest) gives back a 64 px tile on the tile's exact original grid, which
is what the pipeline's 64 px data layer needs (tests/test_eurosat_sample.py does that).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import Affine

from ms2rgb.tasks.data.classes import SCENE_NAMES

HERE = Path(__file__).resolve().parent
PER_CLASS = 6  # with the default data.eurosat_split_fractions, every split gets one location per class
STEP = 4  # 64 px -> 16 px
OFFSET = 1  # of the kept pixel in each STEP x STEP block: its centre lies 5 m from the block's centre
TILE = 64  # EuroSAT_MS tiles are 64 x 64 px
BANDS = 13
# Lossless and the standard codec; predictor 2 (horizontal differencing) suits smooth 16-bit imagery.
PROFILE = {"driver": "GTiff", "compress": "deflate", "predictor": 2, "zlevel": 12, "tiled": False}


def decimate(source: Path, out: Path, step: int = STEP) -> int:
    """Write every `step`-th pixel of one EuroSAT_MS tile to `out`; return the bytes written."""
    with rasterio.open(source) as src:
        if (src.count, src.height, src.width, src.dtypes[0]) != (BANDS, TILE, TILE, "uint16"):
            raise ValueError(
                f"{source}: {src.count} bands of {src.dtypes[0]}, {src.width}x{src.height} px; a EuroSAT_MS tile "
                f"has {BANDS} uint16 bands of {TILE}x{TILE} px. Fix: pass the folder of the original EuroSAT_MS tifs"
            )
        if src.crs is None:
            raise ValueError(f"{source}: no CRS. Fix: use the georeferenced EuroSAT_MS release")
        array = src.read()[:, OFFSET::step, OFFSET::step]  # (13, 64/step, 64/step), bands as in the file
        crs, transform = src.crs, src.transform
    # The sample's pixel (i, j) spans the tile's pixels step*i .. step*i + step - 1: the same footprint.
    grid = transform @ Affine.scale(step)
    out.parent.mkdir(parents=True, exist_ok=True)
    _, height, width = array.shape
    with rasterio.open(
        out, "w", width=width, height=height, count=BANDS, dtype="uint16", crs=crs, transform=grid, **PROFILE
    ) as dst:
        dst.write(array)
    with rasterio.open(out) as check:  # lossless, or the sample would not be genuine values
        if not np.array_equal(check.read(), array):
            raise RuntimeError(f"{out}: read back differs from {source}")
    return out.stat().st_size


def make_sample(source_root: Path, out_root: Path = HERE, per_class: int = PER_CLASS) -> int:
    """Write the sample under out_root/<Class>/<Class>_<n>.tif (old class folders replaced); return its bytes."""
    total = 0
    for cls in SCENE_NAMES:
        sources = [source_root / cls / f"{cls}_{n}.tif" for n in range(1, per_class + 1)]
        missing = [str(p) for p in sources if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{missing[0]} (and {len(missing) - 1} more) not found. Fix: pass the EuroSAT_MS root, "
                "the folder holding the 10 class folders of <Class>_<n>.tif"
            )
        shutil.rmtree(out_root / cls, ignore_errors=True)
        total += sum(decimate(path, out_root / cls / path.name) for path in sources)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="EuroSAT_MS root: <Class>/<Class>_<n>.tif")
    parser.add_argument("--out", type=Path, default=HERE, help="sample root (default: this folder)")
    parser.add_argument("--per-class", type=int, default=PER_CLASS, help="tiles per class")
    args = parser.parse_args()
    total = make_sample(args.source, args.out, args.per_class)
    print(f"{args.per_class * len(SCENE_NAMES)} tiles, {total / 1000:.0f} kB under {args.out}")


if __name__ == "__main__":
    main()
