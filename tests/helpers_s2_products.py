"""Small Sentinel-2 products written here with rasterio: `.SAFE` folders (real JP2 band files and an
ESA-shaped MTD_MSIL1C.xml / MTD_MSIL2A.xml), their zips, STAC items, and the same ground as bare
band files. One ground is 192 x 192 px at 10 m (1920 m: 3 x 3 tiles; 96 px at 20 m, 32 px at 60 m)."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from helpers_data import meadow
from rasterio.transform import Affine

from ms2rgb.models.bands import S2_BANDS
from ms2rgb.tasks.data.sources.stac_item import COMMON_NAMES

SIZE_M = 1920  # metres per side
ORIGIN = (500000.0, 5000000.0)  # UTM 33N
NATIVE = {b: 10 for b in ("B02", "B03", "B04", "B08")} | {b: 60 for b in ("B01", "B09", "B10")}
TILE = "T33UUP"
SENSED = "20220105T100301"
STAC_KEYS = {band: name for name, band in COMMON_NAMES.items()}  # B02 -> "blue"


def native(band: str) -> int:
    return NATIVE.get(band, 20)


def ground(seed: int) -> dict[str, np.ndarray]:
    """Band -> (H, W) reflectance x10000 at its native resolution (a noisy meadow spectrum)."""
    out = {}
    for i, band in enumerate(S2_BANDS):
        n = SIZE_M // native(band)
        out[band] = meadow(seed, n, n)[i]
    return out


def write_band(path: Path, data: np.ndarray, res: int, origin: tuple[float, float] = ORIGIN) -> Path:
    """One uint16 band; JP2 (lossless, as ESA's) for a .jp2 name, else GeoTIFF."""
    path.parent.mkdir(parents=True, exist_ok=True)
    jp2 = path.suffix == ".jp2"
    options: dict[str, Any] = {"driver": "JP2OpenJPEG", "QUALITY": 100, "REVERSIBLE": "YES"} if jp2 else {}
    with rasterio.open(
        path,
        "w",
        driver=options.pop("driver", "GTiff"),
        width=data.shape[1],
        height=data.shape[0],
        count=1,
        dtype="uint16",
        crs="EPSG:32633",
        transform=Affine(res, 0.0, origin[0], 0.0, -res, origin[1]),
        **options,
    ) as dst:
        dst.write(data[None])
    return path


def shifted(bands: dict[str, np.ndarray], offset: int) -> dict[str, np.ndarray]:
    """The DNs a product of that offset stores for this ground: DN = reflectance x10000 - offset."""
    return {b: (a.astype(np.int32) - offset).astype(np.uint16) for b, a in bands.items()}


def write_band_files(folder: Path, bands: dict[str, np.ndarray]) -> list[Path]:
    return [write_band(folder / f"{TILE}_{SENSED}_{b}.tif", bands[b], native(b)) for b in S2_BANDS]


def mtd_xml(level: str, baseline: str, offset: int | None, kind: str | None = None) -> str:
    """The parts of ESA's MTD_MSIL1C.xml / MTD_MSIL2A.xml that ingestion reads, in ESA's nesting."""
    l2a = level == "L2A"
    product_type = kind or ("S2MSI2A" if l2a else "S2MSI1C")
    processing_level = {"S2MSI1C": "Level-1C", "S2MSI2A": "Level-2A"}.get(product_type, "Level-1B")
    quant = (
        '<QUANTIFICATION_VALUES_LIST><BOA_QUANTIFICATION_VALUE unit="none">10000</BOA_QUANTIFICATION_VALUE>'
        '<AOT_QUANTIFICATION_VALUE unit="none">1000.0</AOT_QUANTIFICATION_VALUE></QUANTIFICATION_VALUES_LIST>'
        if l2a
        else '<QUANTIFICATION_VALUE unit="none">10000</QUANTIFICATION_VALUE>'
    )
    tag, wrapper = (
        ("BOA_ADD_OFFSET", "BOA_ADD_OFFSET_VALUES_LIST") if l2a else ("RADIO_ADD_OFFSET", "Radiometric_Offset_List")
    )
    offsets = "".join(f'<{tag} band_id="{i}">{offset}</{tag}>' for i in range(13)) if offset is not None else ""
    name = "Level-2A" if l2a else "Level-1C"
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<n1:{name}_User_Product xmlns:n1="https://psd-14.sentinel2.eo.esa.int/PSD/User_Product_{name}.xsd">'
        f"<n1:General_Info><Product_Info><PROCESSING_LEVEL>{processing_level}</PROCESSING_LEVEL>"
        f"<PRODUCT_TYPE>{product_type}</PRODUCT_TYPE><PROCESSING_BASELINE>{baseline}</PROCESSING_BASELINE>"
        f"</Product_Info><Product_Image_Characteristics>{quant}"
        f"{f'<{wrapper}>{offsets}</{wrapper}>' if offsets else ''}"
        f"</Product_Image_Characteristics></n1:General_Info></n1:{name}_User_Product>\n"
    )


def write_safe(
    parent: Path,
    bands: dict[str, np.ndarray],
    baseline: str = "04.00",
    offset: int | None = -1000,
    granules: int = 1,
    kind: str | None = None,
) -> Path:
    """An L1C .SAFE folder: band files in GRANULE/<granule>/IMG_DATA/ (spread over `granules` granule
    folders), a QI_DATA mask whose name carries a band token (never a band), and MTD_MSIL1C.xml."""
    safe = parent / f"S2A_MSIL1C_{SENSED}_N{baseline.replace('.', '')}_R122_{TILE}_20220105T120000.SAFE"
    names = [f"L1C_{TILE}_A03456{g}_{SENSED}" for g in range(granules)]
    for i, band in enumerate(S2_BANDS):
        if band in bands:
            img = safe / "GRANULE" / names[i % granules] / "IMG_DATA" / f"{TILE}_{SENSED}_{band}.jp2"
            write_band(img, bands[band], native(band))
    qi = safe / "GRANULE" / names[0] / "QI_DATA" / "MSK_QUALIT_B01.jp2"
    write_band(qi, np.ones((8, 8), np.uint16), 60)
    (safe / "MTD_MSIL1C.xml").write_text(mtd_xml("L1C", baseline, offset, kind))
    return safe


def write_l2a_safe(parent: Path, bands: dict[str, np.ndarray], offset: int = -1000) -> Path:
    """An L2A .SAFE: each band in R10m/R20m/R60m at its native resolution, plus coarser copies
    holding another value (so taking any but the finest file changes the tiles)."""
    safe = parent / f"S2B_MSIL2A_{SENSED}_N0400_R122_{TILE}_20220105T130000.SAFE"
    img = safe / "GRANULE" / f"L2A_{TILE}_A034567_{SENSED}" / "IMG_DATA"
    for band, data in bands.items():
        for res in (10, 20, 60):
            if res >= native(band):
                n = SIZE_M // res
                values = data if res == native(band) else np.full((n, n), 7777, np.uint16)
                write_band(img / f"R{res}m" / f"{TILE}_{SENSED}_{band}_{res}m.jp2", values, res)
    (safe / "MTD_MSIL2A.xml").write_text(mtd_xml("L2A", "04.00", offset))
    return safe


def zip_folder(folder: Path, dest: Path) -> Path:
    """`folder` zipped with itself as the top entry, as ESA's download service does."""
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            archive.write(path, path.relative_to(folder.parent).as_posix())
    return dest


def write_stac_item(
    path: Path,
    band_files: dict[str, Path],
    scale_offset: tuple[float, float] | None,
    baseline: str | None = "04.00",
) -> Path:
    """A STAC item whose hrefs are relative to it. Assets are keyed the way Earth Search keys them
    (common names), except B8A, found by its eo:bands name only; a "blue-jp2" copy and a 3-band
    "visual" asset must not be taken. `scale_offset` None: no raster:bands; `baseline` None: no
    s2:processing_baseline."""
    assets: dict[str, Any] = {}
    for band, file in band_files.items():
        key = "asset_8a" if band == "B8A" else STAC_KEYS[band]
        asset: dict[str, Any] = {
            "href": Path(os.path.relpath(file, path.parent)).as_posix(),
            "type": "image/jp2",
            "roles": ["data"],
            "eo:bands": [{"name": band if band == "B8A" else key}],
        }
        if scale_offset:
            asset["raster:bands"] = [{"nodata": 0, "scale": scale_offset[0], "offset": scale_offset[1]}]
        assets[key] = asset
    decoy = {"href": "missing.jp2", "roles": ["data"]}
    assets["blue-jp2"] = decoy | {"eo:bands": [{"name": "blue"}]}
    assets["visual"] = decoy | {"eo:bands": [{"name": "red"}, {"name": "green"}, {"name": "blue"}]}
    west, north = ORIGIN
    item = {
        "type": "Feature",
        "stac_version": "1.0.0",
        "id": f"S2A_{TILE[1:]}_20220105_0_L1C",
        "geometry": {"type": "Point", "coordinates": [15.0, 45.1]},
        "bbox": [15.0, 45.1, 15.02, 45.12],
        "properties": {
            "datetime": "2022-01-05T10:03:01Z",
            "s2:product_type": "S2MSI1C",
            "proj:bbox": [west, north - SIZE_M, west + SIZE_M, north],
        }
        | ({"s2:processing_baseline": baseline} if baseline else {}),
        "links": [],
        "assets": assets,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(item, indent=1))
    return path


def safe_band_files(safe: Path) -> dict[str, Path]:
    found = {p.stem.rsplit("_", 1)[-1]: p for p in safe.glob("GRANULE/*/IMG_DATA/*.jp2")}
    return {b: found[b] for b in S2_BANDS}


def tree_state(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes: equal before and after means nothing changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
