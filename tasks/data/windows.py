"""Rasters of any size, read and written window by window: memory follows a window budget, not the image.

`ImageReader` opens a 3-band uint8 RGB or a 13-band uint16 Sentinel-2 L1C GeoTIFF, checks it once
(file, CRS, bands, dtype; errors name the file and the fix) and returns any window as RGB uint8
with its valid-pixel mask. 13-band windows are rendered exactly as the tiles were
(`render.render_rgb`); only B04, B03 and B02 are read. `match_pixel_size` checks the image's
pixel size against a model's and can resample it on the fly (`tasks/data/pixel_size.py`).
`plan_blocks` cuts an image into blocks whose read window, halo included, holds at most
`budget_px` pixels; `read_padded` reads such a block edge-padded past the image border.
`create_geotiff` opens an output to be written by windows, `staged` moves finished outputs into
place together, and `Thumbnail` keeps a downsampled copy of the image for previews.
`ms2rgb predict` and `ms2rgb detect` share them.
"""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.errors import RasterioIOError
from rasterio.io import DatasetReader, DatasetWriter
from rasterio.transform import Affine
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from ms2rgb.models.bands import RGB_BANDS, S2_BANDS
from ms2rgb.tasks.data.pixel_size import describe, pixel_size, resample_target, warped
from ms2rgb.tasks.data.render import render_rgb
from ms2rgb.tasks.errors import Ms2rgbError, RasterError

# Pixels (rows x columns) one read may cover: a 13-band uint16 window of this size is 104 MB,
# its RGB render 12 MB, and 9 float32 detector logits over it 150 MB.
DEFAULT_WINDOW_PX = 2048 * 2048
INPUT_FIX = (
    "give a 3-band uint8 RGB GeoTIFF (red, green, blue) or a 13-band uint16 Sentinel-2 L1C GeoTIFF "
    "(bands B01..B12 with B8A after B08)"
)
NO_CRS_FIX = (
    "georeference it first, e.g. gdal_edit.py -a_srs EPSG:32633 -a_ullr ... "
    "(outputs must share the input's georeference)"
)


class ImageReader:
    """An RGB or 13-band MS GeoTIFF, open for windowed reads that return RGB uint8.

    Use it as a context manager. `reads` lists the (rows, columns) of every window asked for, so
    a caller (or a test) can check that no read exceeded the budget.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise RasterError(self.path, "file does not exist", "check the path of the image")
        self._file: DatasetReader | None = None  # the file under a resampling WarpedVRT
        try:
            self._src: DatasetReader | WarpedVRT = rasterio.open(self.path)
        except RasterioIOError as exc:
            raise RasterError(self.path, f"cannot be read as a raster ({exc})", INPUT_FIX) from exc
        try:
            self._check()
        except BaseException:
            self._src.close()
            raise
        self.reads: list[tuple[int, int]] = []

    def _check(self) -> None:
        src = self._src
        if src.crs is None:
            raise RasterError(self.path, "has no CRS", NO_CRS_FIX)
        dtypes = set(src.dtypes)
        if src.count == 3 and dtypes == {"uint8"}:
            self.kind, self._indexes = "rgb", [1, 2, 3]
        elif src.count == len(S2_BANDS) and dtypes == {"uint16"}:
            named = tuple(d or "" for d in src.descriptions)
            order = named if set(named) == set(S2_BANDS) else S2_BANDS
            self.kind, self._indexes = "ms", [order.index(b) + 1 for b in RGB_BANDS]
        else:
            raise RasterError(self.path, f"has {src.count} band(s) of {'/'.join(sorted(dtypes))}", INPUT_FIX)

    def match_pixel_size(self, expected: float | None, resample: bool = False) -> str | None:
        """Read at the model's GSD `expected` (m): as the file is when its pixels are within
        `pixel_size.TOLERANCE`, else an error, or with `resample` through a WarpedVRT on the
        model's grid (height, width and transform then describe that grid). Returns a note saying
        so when it resamples. Call it before the first read."""
        target = resample_target(self._src, self.path, expected, resample)
        if target is None:
            return None
        x, y = pixel_size(self._src, self.path)
        self._file, self._src = self._src, warped(self._src, self.path, target)
        return f"resampled from {describe(x, y)} to {target:g} m pixels: outputs are on the {target:g} m grid"

    def __enter__(self) -> ImageReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._src.close()
        if self._file is not None:
            self._file.close()

    @property
    def height(self) -> int:
        return int(self._src.height)

    @property
    def width(self) -> int:
        return int(self._src.width)

    @property
    def crs(self) -> CRS:
        return self._src.crs

    @property
    def transform(self) -> Affine:
        return self._src.transform

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """(RGB uint8 (3, h, w), valid-pixel mask (h, w)) of a window inside the image."""
        rows, cols = int(window.height), int(window.width)
        self.reads.append((rows, cols))
        try:
            bands = self._src.read(self._indexes, window=window)
            valid = self._src.dataset_mask(window=window) > 0
        except RasterioIOError as exc:
            raise RasterError(
                self.path, f"cannot be read at {window} ({exc})", "the file is corrupt or truncated"
            ) from exc
        rgb = bands if self.kind == "rgb" else render_rgb(bands, RGB_BANDS)
        return rgb, valid

    def read_padded(self, row: int, col: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """The window (row, col, height, width), edge-padded where it passes the image's bottom or
        right border; padded pixels are not valid. The read itself covers only the image."""
        inside = Window(col, row, min(width, self.width - col), min(height, self.height - row))
        rgb, valid = self.read(inside)
        pad = ((0, height - rgb.shape[1]), (0, width - rgb.shape[2]))
        if pad[0][1] or pad[1][1]:
            rgb = np.pad(rgb, ((0, 0), *pad), mode="edge")
            valid = np.pad(valid, pad, constant_values=False)
        return rgb, valid


def plan_blocks(height: int, width: int, budget_px: int, halo: int = 0, align: int = 1) -> list[Window]:
    """Output blocks covering the image, in row-major order, whose reads stay within `budget_px`.

    A block of h x w pixels is read with `halo` more pixels on every side (clipped at the image
    border), so the read is at most (h + 2 halo) x (w + 2 halo). Block sides are multiples of
    `align` (except where they end at the image border). Full-width strips are used when a strip
    of `align` rows fits the budget, else square blocks.
    """

    def extent(size: int, total: int) -> int:
        return min(total, size + 2 * halo)

    if extent(align, height) * width <= budget_px:  # full-width strips
        rows = max(align, (budget_px // width - 2 * halo) // align * align)
        block_h, block_w = (height if extent(height, height) * width <= budget_px else rows), width
    else:
        side = (math.isqrt(budget_px) - 2 * halo) // align * align
        if side < align:
            need = (align + 2 * halo) ** 2
            raise Ms2rgbError(
                f"window budget {budget_px} px is too small to read one {align}-px block with a {halo}-px "
                f"halo; give at least {need} px"
            )
        block_h = block_w = side
    return [
        Window(col, row, min(block_w, width - col), min(block_h, height - row))
        for row in range(0, height, block_h)
        for col in range(0, width, block_w)
    ]


@contextmanager
def create_geotiff(
    path: Path,
    *,
    height: int,
    width: int,
    count: int,
    dtype: str,
    crs: CRS,
    transform: Affine,
    nodata: float | None,
    band_names: Sequence[str] = (),
    tags: Mapping[str, str] | None = None,
    colormap: Mapping[int, tuple[int, int, int, int]] | None = None,
) -> Iterator[DatasetWriter]:
    """A deflate-compressed GeoTIFF open for writing by windows (`dst.write(array, window=...)`)."""
    profile: dict[str, Any] = dict(
        driver="GTiff",
        width=width,
        height=height,
        count=count,
        dtype=dtype,
        crs=crs,
        transform=transform,
        nodata=nodata,
        compress="deflate",
    )
    with rasterio.open(path, "w", **profile) as dst:
        for i, name in enumerate(band_names, start=1):
            dst.set_band_description(i, name)
        if tags:
            dst.update_tags(**tags)
        if colormap is not None:
            dst.write_colormap(1, colormap)
        yield dst


@contextmanager
def staged(paths: Sequence[Path]) -> Iterator[list[Path]]:
    """Hidden temp siblings of `paths` to write into; they replace `paths` only when the body
    succeeds, so a failed run leaves no half-written output (and earlier outputs as they were)."""
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    temps = [p.with_name(f".{p.name}.{token}.partial") for p in paths]
    try:
        yield temps
        for tmp, path in zip(temps, paths):
            os.replace(tmp, path)
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)


class Thumbnail:
    """A downsampled RGB copy of an image, built block by block, for previews.

    The factor is the smallest power of two up to 64 that brings the longer side to `max_side`
    pixels or less; each thumbnail pixel is the mean of a factor x factor square. Blocks must
    start at multiples of the factor (a 64-aligned block plan guarantees it).
    """

    def __init__(self, height: int, width: int, max_side: int = 1024) -> None:
        self.factor = next((f for f in (1, 2, 4, 8, 16, 32) if max(height, width) <= max_side * f), 64)
        self.rgb = np.zeros((3, -(-height // self.factor), -(-width // self.factor)), np.uint8)

    def add(self, row: int, col: int, rgb: np.ndarray) -> None:
        """Paste the (3, h, w) block whose top-left pixel is (row, col)."""
        f = self.factor
        if row % f or col % f:
            raise ValueError(f"block at ({row}, {col}) does not start on the thumbnail's {f}-px grid")
        _, h, w = rgb.shape
        padded = np.pad(rgb, ((0, 0), (0, -h % f), (0, -w % f)), mode="edge").astype(np.float32)
        small = padded.reshape(3, padded.shape[1] // f, f, padded.shape[2] // f, f).mean(axis=(2, 4))
        r, c = row // f, col // f
        rows, cols = min(small.shape[1], self.rgb.shape[1] - r), min(small.shape[2], self.rgb.shape[2] - c)
        self.rgb[:, r : r + rows, c : c + cols] = np.round(small[:, :rows, :cols]).astype(np.uint8)
