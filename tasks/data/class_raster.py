"""Class maps people can serve: Cloud-Optimized GeoTIFFs that carry their colours and class names.

`ms2rgb detect` and `ms2rgb predict` write their rasters block by block into a plain GeoTIFF
(GDAL's COG driver can only copy a finished raster), then `to_cog` copies each with the COG
driver: 512-px internal tiles and overviews, so a viewer or a tile server reads only the part and
the zoom level it shows. The copy keeps the colour table, band names and tags. Class names go
into GDAL's sidecar `<name>.tif.aux.xml` (`write_class_names`), the one place GDAL, and through it
QGIS, reads them from a GeoTIFF.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from xml.etree import ElementTree as ET

import numpy as np
import rasterio.shutil

# GDAL's RAT field types and usages (gdal.h GDALRATFieldType / GDALRATFieldUsage).
_INTEGER, _STRING = 0, 2
_NAME, _MIN_MAX, _RED, _GREEN, _BLUE = 2, 5, 6, 7, 8


def to_cog(src: Path, dst: Path, categorical: bool) -> None:
    """Copy the GeoTIFF `src` to a deflate-compressed COG `dst` with overviews.

    Class ids get "mode" overviews (each overview pixel the most frequent class under it: a class
    id has no mean, and nearest would pick one pixel at random); probabilities get "average"."""
    rasterio.shutil.copy(
        src,
        dst,
        driver="COG",
        compress="deflate",
        overview_resampling="mode" if categorical else "average",
    )


def sidecar(path: Path) -> Path:
    """GDAL's PAM sidecar of a raster: `<name>.aux.xml` beside it."""
    return path.with_name(path.name + ".aux.xml")


def write_class_names(path: Path, names: Sequence[str], colours: np.ndarray) -> None:
    """A PAM sidecar at `path` naming class id i `names[i]`, in two forms GIS read from it.

    rasterio cannot set them (GDAL's SetCategoryNames / SetDefaultRAT are not exposed) and GeoTIFF
    has no tag for them, so the XML is written here in GDAL's own PAM format. <CategoryNames> is
    what GDAL reports as the band's categories, and QGIS labels a paletted band's colours with
    them; the thematic raster attribute table (value, class, red, green, blue) is what QGIS 3.30+
    opens under "Raster Attribute Table" and ArcGIS shows, so both old and new viewers get names.
    `colours`: (K, 3) floats in 0..1, the colour table's colours.
    """
    band = ET.Element("PAMRasterBand", band="1")
    categories = ET.SubElement(band, "CategoryNames")
    for name in names:
        ET.SubElement(categories, "Category").text = name
    table = ET.SubElement(band, "GDALRasterAttributeTable", tableType="thematic")
    fields = [("Value", _INTEGER, _MIN_MAX), ("Class", _STRING, _NAME)]
    fields += [(c, _INTEGER, usage) for c, usage in (("Red", _RED), ("Green", _GREEN), ("Blue", _BLUE))]
    for index, (field, kind, usage) in enumerate(fields):
        defn = ET.SubElement(table, "FieldDefn", index=str(index))
        for tag, text in (("Name", field), ("Type", str(kind)), ("Usage", str(usage))):
            ET.SubElement(defn, tag).text = text
    for i, (name, colour) in enumerate(zip(names, colours)):
        row = ET.SubElement(table, "Row", index=str(i))
        for value in (str(i), name, *(str(int(c * 255)) for c in colour[:3])):  # as colour_table
            ET.SubElement(row, "F").text = value
    dataset = ET.Element("PAMDataset")
    dataset.append(band)
    ET.indent(dataset)
    ET.ElementTree(dataset).write(path, encoding="UTF-8", xml_declaration=False)


def colour_table(colours: np.ndarray) -> dict[int, tuple[int, int, int, int]]:
    """A GeoTIFF colour table (class id -> RGBA 0..255) from (K, 3) floats in 0..1."""
    return {i: (int(r * 255), int(g * 255), int(b * 255), 255) for i, (r, g, b) in enumerate(colours)}
