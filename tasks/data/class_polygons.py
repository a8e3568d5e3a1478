"""Polygons of a class raster of any size: sieved, whole across blocks, streamed to GeoJSON / GeoPackage.

`polygonize` reads a finished class raster block by block, so memory follows the window budget
and not the image:

1. Sieve (`min_px` > 1): each block is read with a halo of `min_px` pixels and sieved with GDAL's
   sieve (4-connected, no-data left alone). A region under `min_px` pixels lies within `min_px` - 1
   pixels of each of its pixels, so the halo shows it whole; a larger region reaches from any of
   its block pixels at least `min_px` pixels into the window, so it is never taken for a small one.
   A removed speck takes the class of its largest neighbour as GDAL counts it inside the window; a
   neighbour cut by the window's edge may count smaller than it is, which can change which
   neighbour wins, never whether a speck goes. The sieved blocks are written to a new raster, the
   one that is served, so raster and polygons agree.
2. Polygons: the 4-connected regions of each block, in pixel coordinates. A region touching no
   inner block border is whole and goes to the sinks at once; the pieces that touch one are kept
   and, per class, unioned at the end, so a region crossing blocks comes out as one polygon and
   memory follows the pieces on borders only.

`PolygonSink` writes GeoJSON in WGS84 (RFC 7946 allows no other CRS) and, on request, a GeoPackage
in the raster's own CRS (pixel edges stay exact; QGIS and GDAL read it directly).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import rasterio
import rasterio.features
import rasterio.warp
from rasterio.crs import CRS
from rasterio.io import DatasetReader, DatasetWriter
from rasterio.transform import Affine
from rasterio.windows import Window
from shapely import affinity, unary_union
from shapely.geometry import Polygon, mapping, shape

from ms2rgb.tasks.data.windows import plan_blocks
from ms2rgb.tasks.errors import Ms2rgbError

LAYER = "classes"  # the GeoPackage's layer name


class PolygonSink:
    """Polygons in pixel coordinates of a raster (`transform`, `crs`), written as they come.

    `fields`: per-class text properties, e.g. {"class": names, "description": texts}; every
    feature also gets `class_id` and `area_m2`."""

    def __init__(
        self, geojson: Path, gpkg: Path | None, transform: Affine, crs: CRS, fields: Mapping[str, Sequence[str]]
    ) -> None:
        self.transform, self.crs, self.fields, self.gpkg = transform, crs, dict(fields), gpkg
        # Pixel area in m² (the CRS's units: `detect` refuses degrees before it gets here).
        self.pixel_m2 = abs(transform.determinant) * crs.units_factor[1] ** 2 if crs.is_projected else math.nan
        self.count = 0
        self._json: TextIO = geojson.open("w", encoding="utf-8")
        self._json.write('{"type": "FeatureCollection", "features": [\n')

    def write(self, polygons: Sequence[Polygon], class_ids: Sequence[int]) -> None:
        if not polygons:
            return
        t = self.transform
        native = [affinity.affine_transform(p, [t.a, t.b, t.d, t.e, t.c, t.f]) for p in polygons]
        properties = [
            {
                "class_id": int(c),
                **{key: values[int(c)] for key, values in self.fields.items()},
                "area_m2": round(p.area * self.pixel_m2, 2),
            }
            for p, c in zip(polygons, class_ids)
        ]
        wgs84 = rasterio.warp.transform_geom(self.crs, "EPSG:4326", [mapping(g) for g in native])
        for geometry, props in zip(wgs84, properties):
            prefix = ",\n" if self.count else ""
            self._json.write(prefix + json.dumps({"type": "Feature", "geometry": geometry, "properties": props}))
            self.count += 1
        if self.gpkg is not None:
            self._write_gpkg(native, properties, append=self.count > len(polygons))

    def _write_gpkg(self, geometries: list[Any], properties: list[dict[str, Any]], append: bool) -> None:
        import pyogrio.raw  # with pandas, about 0.8 s of start-up: only `--gpkg` needs it

        names = ["class_id", *self.fields, "area_m2"]
        dtypes: list[Any] = [np.int64, *(object for _ in self.fields), np.float64]
        pyogrio.raw.write(
            self.gpkg,
            np.array([g.wkb for g in geometries], dtype=object),
            [np.array([p[n] for p in properties], dtype=d) for n, d in zip(names, dtypes)],
            names,
            layer=LAYER,
            driver="GPKG",
            geometry_type="Polygon",
            crs=self.crs.to_wkt(),
            append=append,
        )

    def close(self) -> None:
        """Finish the files; a GeoPackage without one polygon still gets its (empty) layer."""
        self._json.write("\n]}\n")
        self._json.close()
        if self.gpkg is not None and self.count == 0:
            self._write_gpkg([], [], append=False)


def max_min_px(budget_px: int) -> int:
    """The largest `min_px` whose halo still leaves a 1-px block within a read of `budget_px`."""
    return max(1, (math.isqrt(budget_px) - 1) // 2)


def polygonize(
    classes: Path, sink: PolygonSink, budget_px: int, nodata: int, min_px: int = 1, sieved: Path | None = None
) -> np.ndarray:
    """Write the regions of the class raster `classes` to `sink` (module docstring); with
    `min_px` > 1, regions under `min_px` pixels are sieved away first and the sieved raster is
    written to `sieved` (a GeoTIFF like `classes`). Returns the pixel count of each value 0..255
    after sieving."""
    if min_px > max_min_px(budget_px):
        raise Ms2rgbError(
            f"--min-area {min_px} px needs a {min_px}-px halo around every block, more than the window budget "
            f"{budget_px} px allows; give --min-area {max_min_px(budget_px)} or less"
        )
    halo = min_px if min_px > 1 else 0
    pieces: dict[int, list[Polygon]] = defaultdict(list)
    counts = np.zeros(256, np.int64)
    with rasterio.open(classes) as src:
        out = _like(src, sieved) if halo else None
        try:
            for block in plan_blocks(src.height, src.width, budget_px, halo=halo):
                ids = _read_sieved(src, block, halo, min_px, nodata)
                counts += np.bincount(ids.ravel(), minlength=256)
                if out is not None:
                    out.write(ids, 1, window=block)
                whole, whole_ids = [], []  # one write a block: each write sets up a reprojection (~0.8 ms)
                for polygon, class_id, on_border in _block_regions(ids, block, src.height, src.width, nodata):
                    if on_border:
                        pieces[class_id].append(polygon)
                    else:
                        whole.append(polygon)
                        whole_ids.append(class_id)
                sink.write(whole, whole_ids)
        finally:
            if out is not None:
                out.close()
    for class_id, parts in sorted(pieces.items()):
        merged = unary_union(parts)
        whole = list(getattr(merged, "geoms", [merged]))  # a MultiPolygon: regions apart
        sink.write(whole, [class_id] * len(whole))
    return counts


def _like(src: DatasetReader, path: Path | None) -> DatasetWriter:
    """A new GeoTIFF at `path` with the profile, colour table, band name and tags of `src`."""
    if path is None:
        raise ValueError("sieving needs a path for the sieved raster")
    dst = rasterio.open(path, "w", **src.profile)
    with suppress(ValueError):  # rasterio's answer for a raster without a colour table
        dst.write_colormap(1, src.colormap(1))
    dst.set_band_description(1, src.descriptions[0] or "")
    dst.update_tags(**src.tags())
    return dst


def _read_sieved(src: DatasetReader, block: Window, halo: int, min_px: int, nodata: int) -> np.ndarray:
    """The block's class ids (h, w), sieved on a read of it with `halo` pixels around it."""
    row, col, rows, cols = int(block.row_off), int(block.col_off), int(block.height), int(block.width)
    if not halo:
        return src.read(1, window=block)
    top, left = max(0, row - halo), max(0, col - halo)
    bottom, right = min(src.height, row + rows + halo), min(src.width, col + cols + halo)
    ids = src.read(1, window=Window(left, top, right - left, bottom - top))
    ids = rasterio.features.sieve(ids, min_px, mask=ids != nodata, connectivity=4)
    return ids[row - top : row - top + rows, col - left : col - left + cols]


def _block_regions(
    ids: np.ndarray, block: Window, height: int, width: int, nodata: int
) -> list[tuple[Polygon, int, bool]]:
    """(polygon in image pixel coordinates, class id, touches an inner block border) of each
    4-connected region of a block."""
    row, col, rows, cols = int(block.row_off), int(block.col_off), int(block.height), int(block.width)
    regions = rasterio.features.shapes(ids, mask=ids != nodata, connectivity=4, transform=Affine.translation(col, row))
    found = []
    for geometry, value in regions:
        polygon = shape(geometry)
        left, top, right, bottom = polygon.bounds  # pixel coordinates: y grows downwards
        on_border = (
            (left == col > 0) or (top == row > 0) or (right == col + cols < width) or (bottom == row + rows < height)
        )
        found.append((polygon, int(value), on_border))
    return found
