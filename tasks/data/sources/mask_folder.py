"""The `folder` segmentation source: the detector's tiles from the user's own images and masks.

`ms2rgb data masks --images DIR --masks DIR --legend legend.yaml` (`import_masks`) pairs every image
with the mask of its file stem (`mask_labels.py` reads ids, colours or vector labels through the
legend, `mask_legend.py`), cuts both into TILE_SIZE squares and writes them into `<folder>/imported/`
(`folder`: `data.segmentation.folder`, default `data/masks`):

    rgb/<image>/<tile>.tif, mask/<image>/<tile>.tif, manifest.parquet (split unset), legend.json, source.json

Only that subfolder is swapped in whole: the folder's committed README (and anything else beside
it) stays. The command refuses to run when an input lies inside it, or when it holds something that
is not an earlier import (no source.json of this source), rather than delete it. source.json names
the inputs by file name and the legend by hash, never by machine path, so two clones hash alike.

Partial tiles at the right and bottom edges are dropped, and so are tiles without one labelled pixel
and tiles more unlabelled than `validate.max_ignore_share` (the caller passes the params value):
validation would stop the run on them, so an import that succeeds leads to a run that passes. Both
counts are printed and recorded in source.json (`left_out`). Written masks hold legend indices
0..N-1 and MASK_NODATA, whatever the input encoding.

With `data.segmentation.source: folder`, prepare (`build_folder_segmentation`) deals whole images to
`captions`, `fewshot` and `seg_test` by `data.segmentation.shares`: every tile of an image has the
image's location id, so the detector is scored on images it never saw.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rasterio.crs import CRS
from rasterio.windows import Window
from rasterio.windows import transform as window_transform

from ms2rgb.models.bands import RGB_BANDS
from ms2rgb.tasks.data.atomic import swap_in_dir, write_json_atomic
from ms2rgb.tasks.data.classes import MASK_NODATA
from ms2rgb.tasks.data.geotiff import TILE_SIZE, sha256_of, tile_bounds, write_tile
from ms2rgb.tasks.data.legend import read_legend, write_legend
from ms2rgb.tasks.data.manifest import (
    FOLDER_SOURCE_PREFIX,
    MANIFEST_NAME,
    SEGMENTATION_SPLITS,
    SEGMENTATION_SUFFIX,
    SOURCE_FILE,
    make_manifest,
    read_manifest,
    write_manifest,
)
from ms2rgb.tasks.data.sources.mask_labels import VECTOR_SUFFIXES, Image, read_image, read_labels
from ms2rgb.tasks.data.sources.mask_legend import MaskLegend, read_mask_legend
from ms2rgb.tasks.data.tile_stats import ignore_share
from ms2rgb.tasks.errors import DataError, DatasetLayoutError

# Under data.segmentation.folder: what `ms2rgb data masks` replaces whole. A subfolder, so the
# folder itself (prepare's DVC dependency) keeps its committed README on a fresh clone.
IMPORT_DIR = "imported"
Progress = Callable[[str], None]
IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
MASK_SUFFIXES = (".tif", ".tiff", ".png", *VECTOR_SUFFIXES)
# Images without a CRS are tiled on their pixel grid in this local CRS (validation needs a CRS on
# every tile; a made-up EPSG code would claim a place on Earth the image does not show).
PIXEL_GRID_CRS = CRS.from_wkt(
    'LOCAL_CS["ms2rgb pixel grid",UNIT["metre",1],AXIS["Easting",EAST],AXIS["Northing",NORTH]]'
)


@dataclass(frozen=True)
class LeftOut:
    """Full tiles an import did not write, by reason."""

    unlabelled: int = 0  # not one labelled pixel: teaches nothing, scores nothing
    mostly_unlabelled: int = 0  # labelled, but a larger unlabelled share than validate.max_ignore_share

    def __add__(self, other: LeftOut) -> LeftOut:
        return LeftOut(self.unlabelled + other.unlabelled, self.mostly_unlabelled + other.mostly_unlabelled)

    def describe(self, max_ignore_share: float) -> str:
        """e.g. "3 without label, 2 more than 90 % unlabelled (validate.max_ignore_share)"."""
        return (
            f"{self.unlabelled} without label, {self.mostly_unlabelled} more than {max_ignore_share * 100:g} % "
            "unlabelled (validate.max_ignore_share)"
        )


@dataclass(frozen=True)
class MaskImport:
    """What `import_masks` wrote: the manifest of its tiles, and what it left out."""

    manifest: pd.DataFrame
    left_out: LeftOut
    max_ignore_share: float  # the limit it applied (the params' validate.max_ignore_share)


def _by_stem(folder: Path, suffixes: tuple[str, ...], what: str) -> dict[str, Path]:
    """stem -> file of the folder with one of `suffixes`; two files of one stem are an error."""
    if not folder.is_dir():
        raise DatasetLayoutError(f"{folder}: no such folder of {what}. Fix: pass an existing folder")
    found: dict[str, Path] = {}
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in suffixes):
        if path.stem in found:
            raise DatasetLayoutError(
                f"{path} and {found[path.stem]}: two {what} share the stem {path.stem!r}. Fix: keep one (masks "
                "are matched to images by stem)"
            )
        found[path.stem] = path
    if not found:
        raise DatasetLayoutError(f"{folder}: holds no {what} ({', '.join(suffixes)}). Fix: point at the right folder")
    return found


def pair_images(images_dir: Path, masks_dir: Path) -> list[tuple[Path, Path]]:
    """(image, mask) pairs by file stem; an image without a mask is an error."""
    images = _by_stem(images_dir, IMAGE_SUFFIXES, "images")
    masks = _by_stem(masks_dir, MASK_SUFFIXES, "masks")
    for stem, image in images.items():
        if stem not in masks:
            raise DataError(
                image,
                f"image without mask: {masks_dir} has no {stem}.<{'|'.join(s[1:] for s in MASK_SUFFIXES)}>",
                "add its mask with the same file stem, or move the image out of the images folder",
            )
    return [(images[stem], masks[stem]) for stem in images]


def _left_out(mask: np.ndarray, max_ignore_share: float) -> LeftOut | None:
    """Why a tile's mask is not written (None: it is). The limit is checked exactly as validation
    checks it (same share, at most the limit passes), so no written tile can fail there."""
    if (mask == MASK_NODATA).all():
        return LeftOut(unlabelled=1)
    if ignore_share(mask) > max_ignore_share:
        return LeftOut(mostly_unlabelled=1)
    return None


def _tile_rows(
    image: Image, labels: np.ndarray, out_dir: Path, size: int, max_ignore_share: float
) -> tuple[list[dict[str, Any]], LeftOut]:
    """Write the full tiles of one image that validation accepts; their manifest rows and what was left out."""
    stem, crs = image.path.stem, image.crs or PIXEL_GRID_CRS
    location = f"{FOLDER_SOURCE_PREFIX}{stem}{SEGMENTATION_SUFFIX}"  # one location per image: splits are by image
    rows, left_out = [], LeftOut()
    for row in range(labels.shape[0] // size):
        for col in range(labels.shape[1] // size):
            cut = (slice(row * size, (row + 1) * size), slice(col * size, (col + 1) * size))
            mask = labels[cut]
            reason = _left_out(mask, max_ignore_share)
            if reason is not None:
                left_out += reason
                continue
            transform = window_transform(Window(col * size, row * size, size, size), image.transform)
            name = f"{stem}-r{row:03d}c{col:03d}"
            rgb_rel, mask_rel = f"rgb/{stem}/{name}.tif", f"mask/{stem}/{name}.tif"
            write_tile(out_dir / rgb_rel, image.rgb[(slice(None), *cut)], crs, transform, band_names=RGB_BANDS)
            write_tile(out_dir / mask_rel, mask[None], crs, transform, band_names=("class",))
            left, bottom, right, top = tile_bounds(transform, size)
            rows.append(
                {
                    "id": f"{FOLDER_SOURCE_PREFIX}{name}-rgb",
                    "modality": "rgb",
                    "path": rgb_rel,
                    "mask_path": mask_rel,
                    "class": None,
                    "split": None,  # dealt by prepare, whole images at a time
                    "source": f"{FOLDER_SOURCE_PREFIX}{stem}",
                    "location_id": location,
                    "crs": crs.to_string(),
                    "bounds_left": left,
                    "bounds_bottom": bottom,
                    "bounds_right": right,
                    "bounds_top": top,
                    "sha256": sha256_of(out_dir / rgb_rel),
                }
            )
    return rows, left_out


def _is_import(folder: Path) -> bool:
    """Whether `folder` holds the source.json an earlier `ms2rgb data masks` wrote."""
    try:
        return json.loads((folder / SOURCE_FILE).read_text()).get("source") == "folder"
    except (OSError, ValueError, AttributeError):
        return False


def check_target(target: Path, inputs: dict[str, Path]) -> None:
    """Refuse a swap that would delete what is not ours: an input inside `target` (or its temp
    sibling), or a non-empty `target` that no earlier import wrote."""
    doomed = [p.resolve() for p in (target, target.with_name(target.name + ".tmp"))]
    for flag, path in inputs.items():
        resolved = path.resolve()
        if any(resolved == d or d in resolved.parents for d in doomed):
            raise DataError(
                path,
                f"{flag} lies inside {target}, which `ms2rgb data masks` replaces whole",
                f"move it out of {target}, or pass another --out",
            )
    if target.is_dir() and any(target.iterdir()) and not _is_import(target):
        raise DataError(
            target,
            f"is not empty and holds no {SOURCE_FILE} of an earlier `ms2rgb data masks`, so it is not replaced",
            "move its files elsewhere (or delete them yourself), or pass another --out",
        )


def _write_tiles(
    pairs: list[tuple[Path, Path]],
    legend: MaskLegend,
    tmp: Path,
    size: int,
    max_ignore_share: float,
    progress: Progress,
) -> tuple[list[dict[str, Any]], LeftOut]:
    """Tile every (image, mask) pair into `tmp`; the manifest rows and what was left out."""
    rows: list[dict[str, Any]] = []
    left_out = LeftOut()
    for image_path, mask_path in pairs:
        image = read_image(image_path)
        if min(image.rgb.shape[1:]) < size:
            raise DataError(
                image_path, f"is {image.rgb.shape[2]}x{image.rgb.shape[1]} px", f"images need {size} px a side"
            )
        new, dropped = _tile_rows(image, read_labels(mask_path, image, legend), tmp, size, max_ignore_share)
        rows += new
        left_out += dropped
        progress(
            f"masks: {image_path.name} + {mask_path.name}: {len(new)} tiles "
            f"(left out: {dropped.describe(max_ignore_share)})"
        )
    return rows, left_out


def import_masks(
    images_dir: Path,
    masks_dir: Path,
    legend_path: Path,
    folder: Path,
    *,
    max_ignore_share: float,
    size: int = TILE_SIZE,
    progress: Progress = print,
) -> MaskImport:
    """Tile every image and its mask into <folder>/IMPORT_DIR (swapped in whole); what was written.

    `max_ignore_share`: the params' validate.max_ignore_share. It has no default on purpose: a
    second value here could disagree with validation, which is what this argument exists to prevent.
    """
    target = folder / IMPORT_DIR
    check_target(target, {"--images": images_dir, "--masks": masks_dir, "--legend": legend_path})
    legend = read_mask_legend(legend_path)
    pairs = pair_images(images_dir, masks_dir)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        rows, left_out = _write_tiles(pairs, legend, tmp, size, max_ignore_share, progress)
        if not rows:
            raise DataError(
                masks_dir,
                f"no tile is labelled enough to keep (left out: {left_out.describe(max_ignore_share)})",
                f"check the masks against {legend_path}, or raise validate.max_ignore_share in params.yaml",
            )
        manifest = make_manifest(rows)
        write_manifest(manifest, tmp / MANIFEST_NAME)
        write_legend(tmp, legend.classes)
        # File names and the legend's hash, not paths: the folder is a DVC dependency, and two clones
        # (or two machines) importing the same files must hash it alike.
        source = {
            "source": "folder",
            "pairs": [[image.name, mask.name] for image, mask in pairs],
            "legend": legend_path.name,
            "legend_sha256": sha256_of(legend_path),
            "max_ignore_share": max_ignore_share,
            "left_out": {"unlabelled": left_out.unlabelled, "mostly_unlabelled": left_out.mostly_unlabelled},
        }
        write_json_atomic(tmp / SOURCE_FILE, source)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written is left beside the folder
        raise
    swap_in_dir(tmp, target)
    return MaskImport(manifest, left_out, max_ignore_share)


def image_splits(locations: list[str], shares: dict[str, float], key: str) -> dict[str, str]:
    """location -> split: the locations (one per image) shuffled by `key` and dealt by the shares,
    at least one to each split (largest remainders get the rest)."""
    n = len(locations)
    if n < len(shares):
        raise DataError(
            "data.segmentation.folder",
            f"{n} image(s) cannot fill the {len(shares)} splits {list(shares)} by image",
            f"give `ms2rgb data masks` at least {len(shares)} images",
        )
    wanted = np.array(list(shares.values())) * n
    counts = np.maximum(1, np.floor(wanted)).astype(int)
    while counts.sum() > n:  # the minimum of one overshot: take back from the largest
        counts[np.argmax(counts)] -= 1
    for i in np.argsort(-(wanted - np.floor(wanted)), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    digest = hashlib.sha256(key.encode()).digest()
    order = np.random.default_rng(int.from_bytes(digest[:8], "little")).permutation(sorted(locations))
    names = np.repeat(list(shares), counts)
    return dict(zip(order.tolist(), names.tolist()))


def _copy(src: Path, dst: Path) -> None:
    """A copy, not a hard link: data/segmentation is a DVC output, and DVC may link (and write-protect)
    its files from its cache, which through a shared inode would reach into the imported folder."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def build_folder_segmentation(
    root: Path, folder: str, out_dir: Path, shares: dict[str, float], seed: int, progress: Progress = print
) -> pd.DataFrame:
    """Deal the tiles imported into <root>/<folder> to the detector's splits by image into `out_dir`;
    the manifest. `folder`: data.segmentation.folder, relative to the project root."""
    imported = root / folder / IMPORT_DIR
    if not (imported / MANIFEST_NAME).is_file():
        raise DataError(
            f"{folder}/{IMPORT_DIR}",
            "data.segmentation.source is 'folder' but no masks were imported there",
            "run `ms2rgb data masks --images DIR --masks DIR --legend legend.yaml`, or set data.segmentation.folder",
        )
    frame = read_manifest(imported / MANIFEST_NAME)
    split_of = image_splits(sorted(set(frame["location_id"].astype(str))), shares, f"{seed}:folder")
    frame["split"] = frame["location_id"].astype(str).map(split_of).astype("string")
    for column in ("path", "mask_path"):
        for rel in frame[column]:
            _copy(imported / rel, out_dir / rel)
    write_manifest(frame, out_dir / MANIFEST_NAME)
    write_legend(out_dir, read_legend(imported))
    # The params' relative folder, not a machine path: data/segmentation is DVC-versioned.
    write_json_atomic(out_dir / SOURCE_FILE, {"source": "folder", "folder": folder})
    counts = frame.groupby("split")["location_id"].nunique().reindex(list(SEGMENTATION_SPLITS), fill_value=0)
    progress(f"segmentation: {len(frame)} tiles of {len(split_of)} images from {folder}: {counts.to_dict()} images")
    return frame
