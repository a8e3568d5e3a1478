"""Read one user image and its labels as (RGB, class indices) on the image's pixel grid.

Images: GeoTIFF, PNG or JPEG of 3 (or 4: no pixel whose alpha is 0 is labelled) uint8 bands, with or
without a CRS. Labels, matched to the image by file stem: a one-band raster of class ids, a colour-coded RGB(A) raster
(fully transparent pixels are ignored), or vector labels (GeoJSON, or GeoPackage read with pyogrio)
whose polygons are burnt onto the image's grid with `rasterio.features.rasterize`. The result holds
legend indices (0..N-1) and MASK_NODATA; any value the legend does not know is an error.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.features
import rasterio.warp
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.transform import Affine, from_origin

from ms2rgb.tasks.data.classes import MASK_NODATA
from ms2rgb.tasks.data.sources.mask_legend import MaskLegend, colour_text
from ms2rgb.tasks.errors import DataError, RasterError

VECTOR_SUFFIXES = (".geojson", ".json", ".gpkg")
GEOJSON_CRS = "EPSG:4326"  # RFC 7946: GeoJSON without a `crs` member is WGS84 longitude/latitude


class MaskValueError(DataError):
    """A mask holds an id, colour or attribute value that the legend does not list."""


@dataclass(frozen=True)
class Image:
    """One user image: (3, H, W) uint8 RGB and its grid (crs None: not georeferenced)."""

    path: Path
    rgb: np.ndarray
    crs: CRS | None
    transform: Affine
    # (H, W) bool, True where the image's alpha band is 0 (no image there, so no label); None: no alpha
    transparent: np.ndarray | None = None


def _open(path: Path) -> tuple[np.ndarray, CRS | None, Affine, dict[int, Any] | None]:
    """(C, H, W) array, CRS, transform and band 1's colour table of any raster GDAL reads."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)  # PNG/JPEG: expected, handled below
            with rasterio.open(path) as src:
                try:
                    palette = src.colormap(1) if src.count == 1 else None
                except ValueError:  # no colour table
                    palette = None
                return src.read(), src.crs, src.transform, palette
    except RasterioIOError as err:
        raise RasterError(path, f"cannot be read as a raster ({err})", "give a GeoTIFF, PNG or JPEG") from err


def read_image(path: Path) -> Image:
    """An RGB image; without a CRS its grid is the pixel grid (1 unit per pixel, origin top-left)."""
    array, crs, transform, _ = _open(path)
    if array.shape[0] not in (3, 4) or array.dtype != np.uint8:
        raise RasterError(
            path,
            f"has {array.shape[0]} band(s) of {array.dtype.name}",
            "images must be 8-bit RGB (3 bands, or 4 with alpha); convert it, e.g. `gdal_translate -ot Byte`",
        )
    if crs is None:
        transform = from_origin(0.0, float(array.shape[1]), 1.0, 1.0)
    transparent = array[3] == 0 if array.shape[0] == 4 else None
    return Image(path, array[:3], crs, transform, transparent)


def read_labels(mask: Path, image: Image, legend: MaskLegend) -> np.ndarray:
    """(H, W) uint8 legend indices of `mask` on `image`'s grid; MASK_NODATA where there is no label,
    and where the image itself is transparent (a label there would teach the detector blank pixels)."""
    if mask.suffix.lower() in VECTOR_SUFFIXES:
        labels = rasterize_vector(mask, image, legend)
    else:
        labels = _raster_labels(mask, image, legend)
    if image.transparent is not None:
        labels[image.transparent] = MASK_NODATA
    return labels


def _raster_labels(mask: Path, image: Image, legend: MaskLegend) -> np.ndarray:
    """(H, W) uint8 legend indices of a raster mask: ids, colours or a palette read as colours."""
    array, _, _, palette = _open(mask)
    if array.shape[1:] != image.rgb.shape[1:]:
        raise RasterError(
            mask,
            f"mask is {array.shape[2]}x{array.shape[1]} px but image {image.path.name} is "
            f"{image.rgb.shape[2]}x{image.rgb.shape[1]} px",
            "give each mask the size of the image with its stem (resample with nearest neighbour)",
        )
    if array.shape[0] == 1 and palette is not None and legend.colours and not legend.ids:
        lut = np.array([palette.get(i, (0, 0, 0, 0))[:3] for i in range(256)], np.uint8)  # (256, 3)
        return map_colours(mask, lut[array[0]].transpose(2, 0, 1), legend)  # a palette PNG read as colours
    if array.shape[0] == 1:
        return map_ids(mask, array[0], legend)
    if array.shape[0] in (3, 4) and array.dtype == np.uint8:
        # Fully transparent pixels are no label whatever their colour: they must not reach the colour lookup.
        return map_colours(mask, array[:3], legend, ignored=array[3] == 0 if array.shape[0] == 4 else None)
    raise RasterError(
        mask, f"has {array.shape[0]} bands of {array.dtype.name}", "give one band of class ids or 8-bit RGB colours"
    )


def _first_at(hit: np.ndarray) -> str:
    row, col = np.argwhere(hit)[0]
    return f"(first at row {row}, col {col})"


def map_ids(mask: Path, ids: np.ndarray, legend: MaskLegend) -> np.ndarray:
    """Class ids -> legend indices; an id neither in the legend nor ignored is an error."""
    if not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0 or ids.max() > 255:
        raise RasterError(mask, f"ids of {ids.dtype.name} span {ids.min()}..{ids.max()}", "store class ids as uint8")
    lut = np.full(256, -1, np.int16)
    lut[list(legend.ignore_ids)] = MASK_NODATA
    for value, index in legend.ids.items():
        lut[value] = index
    out = lut[ids.astype(np.uint8)]
    if (out < 0).any():
        bad = int(ids[out < 0][0])
        raise MaskValueError(
            mask,
            f"id {bad} {_first_at(ids == bad)} is not in the legend {legend.path}",
            f"give a class `id: {bad}` there, or list {bad} under `ignore`",
        )
    return out.astype(np.uint8)


def map_colours(mask: Path, rgb: np.ndarray, legend: MaskLegend, ignored: np.ndarray | None = None) -> np.ndarray:
    """(3, H, W) colours -> legend indices; a colour neither in the legend nor ignored is an error.
    `ignored`: (H, W) bool, pixels without label whatever their colour (a transparent alpha)."""
    keys = (rgb[0].astype(np.int64) << 16) | (rgb[1].astype(np.int64) << 8) | rgb[2]  # (H, W)
    if ignored is not None:
        keys = np.where(ignored, -1, keys)  # -1: no colour has it
    unique, inverse = np.unique(keys, return_inverse=True)
    mapped = np.empty(len(unique), np.uint8)
    for j, key in enumerate(unique.tolist()):
        colour = (key >> 16 & 255, key >> 8 & 255, key & 255)
        if key < 0:
            mapped[j] = MASK_NODATA
        elif colour in legend.colours:
            mapped[j] = legend.colours[colour]
        elif colour in legend.ignore_colours:
            mapped[j] = MASK_NODATA
        else:
            raise MaskValueError(
                mask,
                f"colour {colour_text(colour)} {_first_at(keys == key)} is not in the legend {legend.path}",
                f'give a class `colour: "{colour_text(colour)}"` there, or list it under `ignore`',
            )
    return mapped[inverse].reshape(keys.shape)


def _vector_features(path: Path) -> tuple[list[dict[str, Any]], str]:
    """(GeoJSON-like features, their CRS) of a GeoJSON file, or of a GeoPackage through pyogrio."""
    if path.suffix.lower() == ".gpkg":
        import pyogrio  # here, not at the top: only GeoPackage labels pay for loading its GDAL

        try:
            meta, _, geometries, fields = pyogrio.raw.read(path)
        except pyogrio.errors.DataSourceError as err:
            raise DataError(
                path, f"is not a GeoPackage ({err})", "export the labels again as .gpkg or GeoJSON"
            ) from err
        from shapely import from_wkb

        names = list(meta["fields"])
        features = [
            {
                "geometry": from_wkb(g).__geo_interface__ if g is not None else None,
                "properties": {n: col[i] for n, col in zip(names, fields)},
            }
            for i, g in enumerate(geometries)
        ]
        return features, str(meta["crs"] or GEOJSON_CRS)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(path, f"is not GeoJSON ({err})", "give a FeatureCollection of polygons") from err
    if not isinstance(data, dict) or data.get("type") != "FeatureCollection":
        raise DataError(
            path,
            f"holds a {type(data).__name__} of type {data.get('type') if isinstance(data, dict) else None!r}",
            "give a GeoJSON FeatureCollection",
        )
    named = ((data.get("crs") or {}).get("properties") or {}).get("name")  # pre-RFC 7946 files name theirs
    return list(data.get("features") or []), str(named or GEOJSON_CRS)


def rasterize_vector(path: Path, image: Image, legend: MaskLegend) -> np.ndarray:
    """Burn each polygon's class (by `legend.attribute`) onto the image's grid; later features on top."""
    if image.crs is None:
        raise DataError(
            path,
            f"vector labels need a georeferenced image, but {image.path.name} has no CRS",
            "give the image a CRS (a GeoTIFF) or rasterize the labels yourself",
        )
    features, crs = _vector_features(path)
    shapes = []
    for number, feature in enumerate(features):
        properties = feature.get("properties") or {}
        if legend.attribute not in properties:
            raise MaskValueError(
                path,
                f"feature {number} has no attribute {legend.attribute!r} (it has {sorted(properties)})",
                f"set `attribute:` in {legend.path} to the property that holds the class",
            )
        value = str(properties[legend.attribute])
        if value not in legend.values:
            raise MaskValueError(
                path,
                f"feature {number} has {legend.attribute}={value!r}, which no class of {legend.path} lists",
                f"add `value: {value}` to a class there (known values: {sorted(legend.values)})",
            )
        if feature.get("geometry"):
            shapes.append((rasterio.warp.transform_geom(crs, image.crs, feature["geometry"]), legend.values[value]))
    height, width = image.rgb.shape[1:]
    if not shapes:
        return np.full((height, width), MASK_NODATA, np.uint8)
    return rasterio.features.rasterize(
        shapes, out_shape=(height, width), transform=image.transform, fill=MASK_NODATA, dtype="uint8"
    )
