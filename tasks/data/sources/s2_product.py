"""A Sentinel-2 product as ESA ships it: a `.SAFE` folder, or a zip holding one `*.SAFE/` folder.

Picks the 13 band files under ``GRANULE/<granule>/IMG_DATA/`` (L2A: ``IMG_DATA/R10m|R20m|R60m/``,
each band at the finest resolution it comes in) and reads the product's radiometry from
``MTD_MSIL1C.xml`` / ``MTD_MSIL2A.xml`` (tasks/data/sources/s2_metadata.py). A zip is read in
place through GDAL's ``/vsizip/``: nothing is extracted. QI_DATA masks (``MSK_*_B01.jp2``) and
previews are never taken for bands.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ms2rgb.models.bands import S2_BANDS
from ms2rgb.tasks.data.sources.band_names import RASTER_SUFFIXES, band_from_filename
from ms2rgb.tasks.data.sources.radiometry import Radiometry
from ms2rgb.tasks.data.sources.s2_metadata import parse_metadata
from ms2rgb.tasks.errors import RasterError

_MTD = re.compile(r"^MTD_MSI(\w+)\.xml$", re.IGNORECASE)  # MTD_MSIL1C.xml, MTD_MSIL2A.xml
_IMG = re.compile(r"^GRANULE/([^/]+)/IMG_DATA/(?:R(\d+)m/)?([^/]+)$")
_RES_IN_NAME = re.compile(r"_(\d+)m$")  # L2A: T33UUP_..._B02_10m.jp2


@dataclass(frozen=True)
class Product:
    """One scene's 13 band files, ready for rasterio, and how its DNs become reflectance."""

    where: str  # what was given (folder, zip or STAC item), named in errors
    name: str  # the scene's name: the product's without .SAFE/.zip/.json
    bands: dict[str, str]  # band -> what rasterio opens: a file, a /vsizip/ path or a URL
    radiometry: Radiometry | None  # None: the input says nothing, the offset given for bare files applies


@dataclass(frozen=True)
class _Listing:
    where: str
    names: list[str]  # files relative to the product's root, "/"-separated
    read: Callable[[str], bytes]
    href: Callable[[str], str]


def is_safe_folder(path: Path) -> bool:
    """A folder named *.SAFE, or one holding a product's MTD_MSI*.xml."""
    return path.is_dir() and (path.name.upper().endswith(".SAFE") or any(path.glob("MTD_MSI*.xml")))


def scene_name(name: str) -> str:
    """A product's name without the suffixes people and servers add: .zip, .SAFE, .json."""
    for suffix in (".zip", ".json", ".safe"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return name


def read_safe_folder(path: Path) -> Product:
    names = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    listing = _Listing(str(path), names, lambda rel: (path / rel).read_bytes(), lambda rel: str(path / rel))
    return _product(listing, scene_name(path.name))


def read_safe_zip(path: Path) -> Product:
    """The product inside a zip; band files are opened as /vsizip/<zip>/<inner path> later."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if not n.endswith("/")]
            root = _zip_root(path, names)
            inner = sorted(n[len(root) :] for n in names if n.startswith(root))
            zip_path = path.resolve()
            listing = _Listing(
                str(path), inner, lambda rel: archive.read(root + rel), lambda rel: f"/vsizip/{zip_path}/{root}{rel}"
            )
            return _product(listing, scene_name(root.rstrip("/") or path.name))
    except (zipfile.BadZipFile, OSError) as exc:
        raise RasterError(
            path, f"is not a readable zip archive ({exc})", "re-download it, or zip the .SAFE folder again"
        ) from exc


def _zip_root(path: Path, names: list[str]) -> str:
    """The folder inside the zip that holds the product's MTD file ("" when it lies at the top)."""
    found = [n for n in names if n.count("/") <= 1 and _MTD.match(PurePosixPath(n).name)]
    if len(found) != 1:
        problem = "holds no Sentinel-2 product" if not found else f"holds {len(found)} products ({', '.join(found)})"
        raise RasterError(
            path,
            f"{problem}: expected one MTD_MSIL1C.xml or MTD_MSIL2A.xml at its top or in one *.SAFE/ folder",
            "zip exactly one .SAFE folder per file",
        )
    return found[0].rpartition("/")[0] + "/" if "/" in found[0] else ""


def _product(listing: _Listing, name: str) -> Product:
    mtd = [n for n in listing.names if "/" not in n and _MTD.match(n)]
    if len(mtd) != 1:
        raise RasterError(
            listing.where,
            f"holds {len(mtd) or 'no'} product metadata file(s) (MTD_MSIL1C.xml / MTD_MSIL2A.xml) at its top",
            "pass the whole .SAFE folder (or its zip) as downloaded",
        )
    match = _MTD.match(mtd[0])
    name_level = match.group(1).upper() if match and match.group(1).upper() in ("L1C", "L2A") else None
    radiometry = parse_metadata(listing.read(mtd[0]), f"{listing.where}/{mtd[0]}", name_level)
    bands = _pick_bands(listing)
    check_bands(listing.where, set(bands), radiometry.level, "GRANULE/*/IMG_DATA/")
    return Product(listing.where, name, {b: listing.href(bands[b]) for b in S2_BANDS}, radiometry)


def _resolution(folder_res: str | None, stem: str) -> int:
    in_name = _RES_IN_NAME.search(stem)
    return int(folder_res or (in_name.group(1) if in_name else 0))


def _pick_bands(listing: _Listing) -> dict[str, str]:
    """Band -> file of the finest resolution, from the one granule's IMG_DATA."""
    found = []  # (granule, resolution, band, file)
    for rel in listing.names:
        match, path = _IMG.match(rel), PurePosixPath(rel)
        band = band_from_filename(path) if match and path.suffix.lower() in RASTER_SUFFIXES else None
        if match is not None and band is not None:
            found.append((match.group(1), _resolution(match.group(2), path.stem), band, rel))
    granules = sorted({granule for granule, *_ in found})
    if len(granules) > 1:
        raise RasterError(
            listing.where,
            f"mixes bands of {len(granules)} granules ({', '.join(granules)}); a scene is one tile",
            "keep one GRANULE/ folder, or ingest each granule's product on its own",
        )
    best: dict[str, tuple[int, str]] = {}
    for _, res, band, rel in found:
        if band in best and best[band][0] == res:
            raise RasterError(listing.where, f"holds two files of band {band}: {best[band][1]} and {rel}", "keep one")
        if band not in best or res < best[band][0]:
            best[band] = (res, rel)
    return {band: rel for band, (_, rel) in best.items()}


def check_bands(where: str, found: set[str], level: str | None, looked_in: str) -> None:
    """Raise when any of the 13 bands is missing; Level-2A's missing B10 gets its own fix."""
    missing = [b for b in S2_BANDS if b not in found]
    if not missing:
        return
    if level == "L2A" and missing == ["B10"]:
        raise RasterError(
            where,
            "is a Level-2A product: it has no B10 (Sen2Cor drops the cirrus band) and the MS pool holds all 13",
            "ingest the Level-1C (MSIL1C) product of this scene",
        )
    raise RasterError(
        where,
        f"lacks bands {missing} of the 13 Sentinel-2 bands (looked in {looked_in})",
        "pass the complete product as downloaded; a partial download misses band files",
    )
