"""GeoTIFFs written with rasterio for the windowed-reading tests, and a record of every read."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import rasterio.io
from rasterio.transform import from_origin

CRS = "EPSG:32633"
TRANSFORM = from_origin(600000.0, 5100000.0, 10.0, 10.0)


def write_raster(
    path: Path,
    data: np.ndarray,
    crs: str | None = CRS,
    nodata: float | None = None,
    band_names: Sequence[str] = (),
) -> Path:
    """A (C, H, W) array as a GeoTIFF on the test grid (10 m pixels in UTM 33N)."""
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=data.shape[2],
        height=data.shape[1],
        count=data.shape[0],
        dtype=data.dtype.name,
        crs=crs,
        transform=TRANSFORM,
        nodata=nodata,
    ) as dst:
        dst.write(data)
        for i, name in enumerate(band_names, start=1):
            dst.set_band_description(i, name)
    return path


def smooth_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    """(3, H, W) uint8 with large regions of different colour and texture, so cells differ."""
    gen = np.random.default_rng(seed)
    coarse = gen.integers(0, 256, (3, height // 32 + 2, width // 32 + 2))
    base = np.repeat(np.repeat(coarse, 32, axis=1), 32, axis=2)[:, :height, :width]
    noise = gen.integers(-20, 21, (3, height, width))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


@contextmanager
def recorded_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, int, int]]]:
    """Every pixel read (band data or masks) of any dataset opened for reading, as (call, rows, cols);
    a read without a window is recorded with the dataset's full size."""
    calls: list[tuple[str, int, int]] = []

    def wrap(name: str) -> Any:
        original = getattr(rasterio.io.DatasetReader, name)

        def recording(self: rasterio.io.DatasetReader, *args: Any, **kwargs: Any) -> Any:
            window = kwargs.get("window")
            rows, cols = (self.height, self.width) if window is None else (int(window.height), int(window.width))
            calls.append((name, rows, cols))
            return original(self, *args, **kwargs)

        return recording

    with monkeypatch.context() as patch:
        for name in ("read", "read_masks", "dataset_mask"):
            patch.setattr(rasterio.io.DatasetReader, name, wrap(name))
        yield calls
