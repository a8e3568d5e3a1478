"""What `ingest_scene` was handed, as the files to open and how their DNs become reflectance.

Plain inputs are one 13-band GeoTIFF, per-band files (the band named in the file name) or folders of
them; the offset given for bare files applies to them. A product comes on its own: a ``.SAFE``
folder, a zip holding one (tasks/data/sources/s2_product.py), a STAC item ``.json`` or URL, or a
folder holding one STAC item and its assets (tasks/data/sources/stac_item.py); it names its own
band files and brings its radiometry from its metadata.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from ms2rgb.tasks.data.sources.band_names import BAND_TOKEN, RASTER_SUFFIXES, band_from_filename
from ms2rgb.tasks.data.sources.radiometry import Radiometry
from ms2rgb.tasks.data.sources.s2_product import Product, is_safe_folder, read_safe_folder, read_safe_zip
from ms2rgb.tasks.data.sources.stac_item import is_stac_item_file, read_stac_item
from ms2rgb.tasks.errors import Ms2rgbError, RasterError

Input = Path | str  # a str with "://" is a URL (a STAC item); anything else a local path


@dataclass(frozen=True)
class SceneInputs:
    files: list[Input]  # what rasterio opens: local files, /vsizip/ paths or URLs
    bands: dict[str, Input] | None  # band -> file for a product; None: from file names, or the 13-band file
    radiometry: Radiometry  # how DNs become the stored reflectance x10000
    name: str  # the default scene id


def safe_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", text.strip("_-. "))
    return name.lstrip("_.-") or "scene"


def default_scene_id(inputs: Sequence[Path]) -> str:
    """The filenames' common prefix with band tokens removed, e.g. "s2" for s2_B01.jp2 ... s2_B12.jp2."""
    stems = [BAND_TOKEN.sub("", Path(p).stem) for p in inputs] or ["scene"]
    prefix = stems[0]
    for stem in stems[1:]:
        while not stem.startswith(prefix):
            prefix = prefix[:-1]
    return safe_name(prefix)


def resolve_inputs(inputs: Sequence[Input], given: Radiometry) -> SceneInputs:
    """The scene's files; `given` is the radiometry of inputs whose metadata says nothing."""
    items = [i if isinstance(i, str) and "://" in i else Path(i) for i in inputs]
    if not items:
        raise Ms2rgbError("ingest_scene: no input files given; pass band files, one 13-band GeoTIFF or one product")
    products = [(item, product) for item in items if (product := _product(item)) is not None]
    if products and len(items) > 1:
        raise RasterError(
            products[0][0],
            "is a whole product but came with other inputs",
            "ingest a product (.SAFE, zip, STAC item) on its own",
        )
    if products:
        product = products[0][1]
        bands: dict[str, Input] = dict(product.bands)
        return SceneInputs(list(bands.values()), bands, _radiometry(product, given), safe_name(product.name))
    files = _expand([Path(i) for i in items])
    return SceneInputs(list(files), None, given, default_scene_id(files))


def _product(item: Input) -> Product | None:
    if isinstance(item, str):
        return read_stac_item(item)
    if is_safe_folder(item):
        return read_safe_folder(item)
    if item.is_file() and item.suffix.lower() == ".zip":
        return read_safe_zip(item)
    if item.is_file() and item.suffix.lower() == ".json":
        return read_stac_item(str(item))
    if item.is_dir():
        found = [p for p in sorted(item.glob("*.json")) if is_stac_item_file(p)]
        if len(found) > 1:
            raise RasterError(item, f"holds {len(found)} STAC items", "put one item (and its assets) per folder")
        return read_stac_item(str(found[0])) if found else None
    return None


def _radiometry(product: Product, given: Radiometry) -> Radiometry:
    """The product's own radiometry; the offset given for bare files only when it states none.

    A `--offset` contradicting what the product states is refused, but it overrides an offset
    inferred from the processing baseline alone (a host may serve DNs already shifted back)."""
    own = product.radiometry
    if own is None:
        said = "states no offset (no raster:bands offsets, no s2:processing_baseline)"
        note = f"{product.where} {said}; the offset for bare files applies: {given.describe()}"
        return replace(given, notes=(*given.notes, note))
    if given.source == "option" and given.offsets != own.offsets:
        if own.source == "baseline":
            note = f"--offset {given.offsets['B01']:g} given over the baseline rule ({own.notes[0]})"
            return replace(given, baseline=own.baseline, level=own.level, notes=(note,))
        raise Ms2rgbError(
            f"{product.where}: its metadata ({own.origin}) gives offset(s) {sorted(set(own.offsets.values()))} "
            f"but --offset {given.offsets['B01']:g} was given. Fix: drop --offset; a product's own metadata applies"
        )
    if given.source == "param":
        return replace(own, notes=(*own.notes, f"{given.origin} not used: the product's metadata applies"))
    return own


def _expand(inputs: list[Path]) -> list[Path]:
    """Replace folders by the band files inside them (other files, e.g. preview.jp2, are skipped)."""
    files: list[Path] = []
    for path in inputs:
        if not path.is_dir():
            files.append(path)
            continue
        found = sorted(p for p in path.iterdir() if p.suffix.lower() in RASTER_SUFFIXES and band_from_filename(p))
        if not found:
            raise RasterError(path, "folder holds no band files", "name band files like *_B02.jp2")
        files.extend(found)
    return files
