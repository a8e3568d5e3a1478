"""The input's pixel size against the model's: go on, stop with the fix, or resample on the fly.

A model sees objects at the ground sample distance (GSD) of its training tiles: fed a 5 m image,
a model of 10 m tiles sees every field twice as large and answers wrong classes without any
error. So `ms2rgb detect` and `ms2rgb predict` compare the two before reading a pixel
(`ImageReader.match_pixel_size`): within `TOLERANCE` they go on; otherwise they stop naming both
sizes, or, when asked (`--resample`), read the image through a `WarpedVRT` that resamples it on
the fly to the model's GSD over the same bounds, and their outputs are on that grid.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.io import DatasetReader
from rasterio.transform import Affine
from rasterio.vrt import WarpedVRT

from ms2rgb.tasks.data.geotiff import PIXEL_SIZE
from ms2rgb.tasks.errors import RasterError

# Relative difference still read as it is: a Sentinel-2 scene reprojected into a neighbouring
# UTM zone keeps pixels within ~1 % of 10 m, while a 2x finer or coarser image is 50-100 % off.
TOLERANCE = 0.10


def training_pixel_size(model: object) -> float | None:
    """The GSD in metres `model` was trained at (its `pixel_size_m`), or None when it records that
    it is unknown (a detector tuned on a user's own images: the stage sees their tiles, not their
    GSD). A model that records nothing (saved before the field existed, or a torch.export graph,
    which keeps no attributes) was trained on PIXEL_SIZE tiles, the only GSD this project makes."""
    return getattr(model, "pixel_size_m", PIXEL_SIZE)


def recorded_pixel_size(state: Mapping[str, Any]) -> float | None:
    """The training GSD a saved detector (detector.pt) records; one written before the field
    existed was tuned on the project's PIXEL_SIZE tiles, the only GSD the project made then."""
    return state.get("pixel_size_m", PIXEL_SIZE)


def metres_per_unit(crs: CRS, path: Path) -> float:
    """Metres per unit of the CRS's axes; raises for a geographic CRS.

    Degrees are refused rather than converted: a degree of longitude shrinks with latitude, so a
    pixel has no one size in metres, and resampling it to square metre pixels needs a projected
    CRS, which would move every output off the input's grid. Reprojecting is the user's choice."""
    if crs.is_geographic:
        raise RasterError(
            path,
            f"has a geographic CRS ({crs.to_string()}) whose pixels are degrees, not metres",
            "reproject it to a projected CRS in metres, e.g. its UTM zone: "
            "gdalwarp -t_srs EPSG:326NN -tr 10 10 -r average in.tif out.tif",
        )
    return float(crs.units_factor[1])


def pixel_size(src: DatasetReader | WarpedVRT, path: Path) -> tuple[float, float]:
    """(x, y) pixel size of a raster in metres."""
    factor = metres_per_unit(src.crs, path)
    x_res, y_res = src.res
    return x_res * factor, y_res * factor


def describe(x: float, y: float) -> str:
    """A pixel size for messages: "5 m", or "5 x 6 m" when not square."""
    return f"{x:g} m" if x == y else f"{x:g} x {y:g} m"


def resample_target(src: DatasetReader | WarpedVRT, path: Path, expected: float | None, resample: bool) -> float | None:
    """The GSD to resample `src` to, or None to read it as it is; raises when its pixels are
    outside TOLERANCE of `expected` and `resample` is off. `expected` None: nothing to check."""
    if expected is None:
        return None
    x, y = pixel_size(src, path)
    if max(abs(x - expected), abs(y - expected)) <= TOLERANCE * expected:
        return None
    if not resample:
        raise RasterError(
            path,
            f"has {describe(x, y)} pixels but the model was trained on {expected:g} m pixels",
            f"pass --resample (resample=True) to resample it to {expected:g} m on the fly, or resample it first: "
            f"gdalwarp -tr {expected:g} {expected:g} -r average in.tif out.tif",
        )
    return expected


def warped(src: DatasetReader | WarpedVRT, path: Path, target: float) -> WarpedVRT:
    """`src` resampled on the fly to `target` m pixels over (nearly) the same bounds, north up.

    Average when the image is finer, so each output pixel is the mean of the input pixels under it
    (what a coarser sensor would record); bilinear when it is coarser, which makes no new detail."""
    step = target / metres_per_unit(src.crs, path)
    left, bottom, right, top = src.bounds
    width, height = max(1, round((right - left) / step)), max(1, round((top - bottom) / step))
    finer = min(pixel_size(src, path)) < target
    return WarpedVRT(
        src,
        crs=src.crs,
        transform=Affine(step, 0.0, left, 0.0, -step, top),
        width=width,
        height=height,
        resampling=Resampling.average if finer else Resampling.bilinear,
    )
