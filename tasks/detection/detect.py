"""`ms2rgb detect`: a land-cover class map of a GeoTIFF of any size with the tuned detector.

Input: a 3-band uint8 RGB GeoTIFF (bands red, green, blue — EuroSAT's / our tiles' B04, B03,
B02 rendering) or a 13-band uint16 Sentinel-2 L1C GeoTIFF, which is rendered to RGB exactly
as the training tiles were (``tasks/data/windows.py``; band descriptions, when they name
all 13 bands, give the order). It needs a CRS. Classes: the names of the detector's own
legend (the classes it was tuned on, e.g. a user's from ``ms2rgb data masks``), land-cover
surface names (``crop``, ``water``, ...), scene names (``River`` -> its description) or free
descriptions of two or more words (``"red tiled roofs"``); one unknown word is an error.

The image is scored in 64-px windows (the tiles' size) with overlap; each pixel gets the mean
of the logits of every window covering it, which hides window seams. It is read and written
block by block: a block is read with the 63-px margin its windows need, each read at most
``window_px`` pixels, so memory follows that budget (about 3 + 4 K bytes per pixel of it for K
classes) and not the image. Every pixel sees the same windows as in a whole-image pass.

Model: the registered champion ``models:/<prefix>-detector@champion`` (``tracking.model_prefix`` in the
project's params.yaml: ``models:/ms2rgb-detector@champion`` by default); when it cannot be loaded (no
champion alias yet, an unreachable tracking server) the command stops and says how to fix it.
``artifacts/detector/`` is used only when asked for (``model_uri="artifacts"``, ``--model artifacts``)
or when there is no tracking store at all, and the result says so (``tasks/tracking/champion.py``).
``model_uri`` picks a registered version.

Pixel size: the image's must be within 10 % of the GSD the detector was tuned at (10 m for the
project's tiles; a detector tuned on a user's own images records none and is not checked), else
the command stops naming both; ``resample=True`` (``--resample``) reads it resampled on the fly to
that GSD instead, and the outputs are on that grid (``tasks/data/pixel_size.py``).

Outputs in ``out_dir``: ``<stem>_classes.tif`` (a Cloud-Optimized GeoTIFF of uint8 class ids,
255 = no data, same CRS and transform, internal tiles, overviews, a colour table;
``tasks/data/class_raster.py``) with ``<stem>_classes.tif.aux.xml`` (the class names as GDAL
categories and a raster attribute table, which QGIS shows), ``<stem>_overlay.png`` (image, class
colours, legend; downsampled to at most 1024 px a side) and ``<stem>_classes.geojson`` (one
polygon per connected region, whole across processing blocks, WGS84 as RFC 7946 requires;
``tasks/data/class_polygons.py``), plus ``<stem>_classes.gpkg`` (the same polygons in the image's
CRS) with ``gpkg=True``. With ``min_area_px`` > 1, regions of fewer pixels are sieved away from
both the raster and the polygons (they take their largest neighbour's class).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import numpy as np
import torch
from rasterio.windows import Window

from ms2rgb.models.clip_detector import ClassMapDetector
from ms2rgb.tasks.data.artifacts import LOCAL_MODEL
from ms2rgb.tasks.data.class_polygons import PolygonSink, max_min_px, polygonize
from ms2rgb.tasks.data.class_raster import colour_table, to_cog, write_class_names
from ms2rgb.tasks.data.classes import MASK_NODATA, SCENE_CLASSES, SURFACE_CLASSES
from ms2rgb.tasks.data.pixel_size import training_pixel_size
from ms2rgb.tasks.data.windows import DEFAULT_WINDOW_PX, ImageReader, Thumbnail, create_geotiff, plan_blocks, staged
from ms2rgb.tasks.detection.model import DETECTOR_FILE, OUT_DIR, load_detector, tokenizer_for
from ms2rgb.tasks.errors import Ms2rgbError, UnknownClassError
from ms2rgb.tasks.training.loop import autocast, pick_device

WINDOW = 64
Score = Callable[[torch.Tensor], torch.Tensor]


def _key(name: str) -> str:
    return name.lower().replace(" ", "").replace("_", "")


def class_names(spec: str) -> list[str]:
    """The names of a comma-separated --classes; raises when it names none or one twice. Checked
    before the detector is loaded, so a typo costs no model load."""
    names = [part.strip() for part in spec.split(",") if part.strip()]
    if not names:
        raise Ms2rgbError(
            f"--classes {spec!r} names no class; give comma-separated names such as "
            f"'water,forest,roof' (known names: {list(SURFACE_CLASSES) + list(SCENE_CLASSES)}) "
            "or descriptions of 2+ words"
        )
    repeated = sorted({n for n in names if [_key(m) for m in names].count(_key(n)) > 1})
    if repeated:
        raise Ms2rgbError(f"--classes lists {repeated} more than once; name each class once")
    return names


def resolve_classes(spec: str, own: Mapping[str, str] | None = None) -> tuple[list[str], list[str]]:
    """Comma-separated class names -> (names, texts the CLIP reads). See the module docstring.

    `own`: the detector's own classes (name -> description, from the legend it was tuned on); they
    come first, so a class of a user's legend is known by its one-word name."""
    names, own = class_names(spec), dict(own or {})
    lookup = {_key(n): d for table in (SCENE_CLASSES, SURFACE_CLASSES, own) for n, d in table.items()}
    texts = []
    for name in names:
        if _key(name) in lookup:
            texts.append(lookup[_key(name)])
        elif len(name.split()) > 1:
            texts.append(name)  # a free description is read as it is
        else:
            valid = list(dict.fromkeys([*own, *SURFACE_CLASSES, *SCENE_CLASSES]))
            raise UnknownClassError(name, valid, "--classes (free descriptions need two or more words)")
    return names, texts


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Window offsets covering 0..size with the last window flush with the end."""
    if size <= window:
        return [0]
    starts = list(range(0, size - window + 1, stride))
    return starts if starts[-1] == size - window else starts + [size - window]


@torch.no_grad()
def _mean_logits(
    score: Score,
    region: np.ndarray,
    corners: Sequence[tuple[int, int]],
    n_classes: int,
    batch_size: int,
    device: torch.device,
) -> np.ndarray:
    """Mean logits (K, h, w) over `region` (3, h, w) of the 64-px windows whose top-left corners
    (region coordinates) are `corners`, scored in batches in the order given."""
    _, height, width = region.shape
    acc = np.zeros((n_classes, height, width), np.float32)
    hits = np.zeros((height, width), np.float32)
    for i in range(0, len(corners), batch_size):
        chunk = corners[i : i + batch_size]
        tiles = torch.from_numpy(np.stack([region[:, r : r + WINDOW, c : c + WINDOW] for r, c in chunk]))
        with autocast(device):
            logits = score(tiles.to(device)).float().cpu().numpy()  # (B, K, 64, 64)
        for (r, c), tile_logits in zip(chunk, logits):
            acc[:, r : r + WINDOW, c : c + WINDOW] += tile_logits
            hits[r : r + WINDOW, c : c + WINDOW] += 1
    return acc / hits


def sliding_logits(
    score: Score, rgb: np.ndarray, n_classes: int, stride: int, batch_size: int, device: torch.device
) -> np.ndarray:
    """Mean logits (K, H, W) of 64-px windows over a whole image in memory; images smaller than
    a window are edge-padded. `block_logits` gives the same values block by block."""
    height, width = rgb.shape[1:]
    padded = np.pad(rgb, ((0, 0), (0, max(0, WINDOW - height)), (0, max(0, WINDOW - width))), mode="edge")
    ph, pw = padded.shape[1:]
    corners = [(r, c) for r in window_starts(ph, WINDOW, stride) for c in window_starts(pw, WINDOW, stride)]
    return _mean_logits(score, padded, corners, n_classes, batch_size, device)[:, :height, :width]


def block_logits(
    score: Score,
    reader: ImageReader,
    block: Window,
    n_classes: int,
    stride: int,
    batch_size: int,
    device: torch.device,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean logits (K, h, w), RGB (3, h, w), valid mask (h, w)) of one block of the image.

    Only the windows of the whole-image grid that touch the block are scored, on one read of
    the region they span (the block plus at most 63 px a side), so each pixel of the block gets
    the mean over exactly the windows `sliding_logits` would give it.
    """
    row, col, rows, cols = int(block.row_off), int(block.col_off), int(block.height), int(block.width)
    row_starts = [s for s in window_starts(max(reader.height, WINDOW), WINDOW, stride) if row - WINDOW < s < row + rows]
    col_starts = [s for s in window_starts(max(reader.width, WINDOW), WINDOW, stride) if col - WINDOW < s < col + cols]
    top, left = row_starts[0], col_starts[0]
    region, valid = reader.read_padded(top, left, row_starts[-1] + WINDOW - top, col_starts[-1] + WINDOW - left)
    corners = [(r - top, c - left) for r in row_starts for c in col_starts]
    logits = _mean_logits(score, region, corners, n_classes, batch_size, device)
    inner = (slice(row - top, row - top + rows), slice(col - left, col - left + cols))
    return logits[(slice(None), *inner)], region[(slice(None), *inner)], valid[inner]


def choose_detector(root: Path, model_uri: str | None) -> tuple[ClassMapDetector, str, str | None]:
    """(detector, where it came from, why the champion was not used or None).

    `model_uri` a registered model: that one. "artifacts": the detector stage's artifacts. None: the
    registered champion, or an error naming the store and the fix; the stage's artifacts only when
    there is no tracking store at all (tasks/tracking/champion.py).
    """
    if model_uri == LOCAL_MODEL:  # checked before tasks.tracking (MLflow) is imported: it is not needed
        return (*load_detector(root, None), None)
    if model_uri is not None:
        return (*load_detector(root, model_uri), None)
    from ms2rgb.tasks.tracking import CHAMPION
    from ms2rgb.tasks.tracking.champion import has_store, load_champion, registered_name, store_uri

    if not has_store(root):  # nothing registered anywhere: the stage's artifacts are all there is
        try:
            model, source = load_detector(root, None)
        except Ms2rgbError as err:
            raise Ms2rgbError(f"no detector: no MLflow store ({store_uri(root)}), and {err}") from err
        return model, source, f"no MLflow store ({store_uri(root)}), so no champion; used {source}"
    name = registered_name(root, "detector")
    champion = f"models:/{name}@{CHAMPION}"
    module = load_champion(root, name, root / OUT_DIR / DETECTOR_FILE)
    if not isinstance(module, ClassMapDetector):
        raise Ms2rgbError(
            f"{champion} holds a {type(module).__name__}, not a ClassMapDetector. Fix: make a version of "
            f"{name} champion (`ms2rgb promote {name} <version>`), or pass --model {LOCAL_MODEL}"
        )
    return module, champion, None


def write_overlay(path: Path, rgb: np.ndarray, classes: np.ndarray, names: list[str], colours: np.ndarray) -> None:
    """The image with class colours at 45 % opacity and a legend."""
    from matplotlib.figure import Figure

    from ms2rgb.tasks.detection.plots import legend_handles

    height, width = classes.shape
    dpi = 100
    scale = max(1.0, 400 / max(height, width))  # small images are enlarged so the legend stays readable
    fig = Figure(figsize=(width * scale / dpi, height * scale / dpi + 0.6), dpi=dpi)
    ax = fig.add_axes((0, 0.6 / (height * scale / dpi + 0.6), 1, 1 - 0.6 / (height * scale / dpi + 0.6)))
    colour = np.vstack([colours, np.zeros((256 - len(colours), 3))])[classes]  # (H, W, 3); no data black
    blended = 0.55 * rgb.transpose(1, 2, 0) / 255.0 + 0.45 * colour
    ax.imshow(
        np.where((classes == MASK_NODATA)[..., None], rgb.transpose(1, 2, 0) / 255.0, blended), interpolation="nearest"
    )
    ax.set_axis_off()
    fig.legend(handles=legend_handles(names), loc="lower center", ncol=min(5, len(names)), fontsize=7, frameon=False)
    fig.savefig(path, dpi=dpi, format="png")


def output_paths(out_dir: Path, stem: str, gpkg: bool) -> dict[str, Path]:
    """Where each output goes, by kind; the GeoPackage only when asked for."""
    kinds = ["classes.tif", "classes.tif.aux.xml", "overlay.png", "classes.geojson"]
    kinds += ["classes.gpkg"] if gpkg else []
    return {kind: out_dir / f"{stem}_{kind}" for kind in kinds}


def scorer(model: ClassMapDetector, texts: list[str]) -> tuple[Score, torch.device]:
    """(tiles -> logits of `texts`, the device it runs on), with the model moved there."""
    device = pick_device()
    model.to(device).eval()
    tokens = tokenizer_for(model)(texts).to(device)
    own = list(texts) == list(model.texts)  # its pixel evidence knows the tuned classes only

    def score(tiles: torch.Tensor) -> torch.Tensor:
        return model(tiles) if own else model.logits_for(tiles, tokens)

    return score, device


def write_class_ids(
    path: Path,
    reader: ImageReader,
    blocks: Sequence[Window],
    score: tuple[Score, torch.device],
    names: list[str],
    colours: np.ndarray,
    stride: int,
    batch_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Score every block into the GeoTIFF `path` (class ids, 255 where the input has no data);
    returns the thumbnail RGB and its class ids for the overlay."""
    thumb = Thumbnail(reader.height, reader.width)
    step = thumb.factor
    small = np.full(thumb.rgb.shape[1:], MASK_NODATA, np.uint8)
    with create_geotiff(
        path,
        height=reader.height,
        width=reader.width,
        count=1,
        dtype="uint8",
        crs=reader.crs,
        transform=reader.transform,
        nodata=MASK_NODATA,
        band_names=["class id"],
        tags={"classes": json.dumps(dict(enumerate(names)))},
        colormap=colour_table(colours),
    ) as dst:
        for block in blocks:
            logits, rgb, valid = block_logits(score[0], reader, block, len(names), stride, batch_size, score[1])
            ids = np.where(valid, logits.argmax(0), MASK_NODATA).astype(np.uint8)
            dst.write(ids, 1, window=block)
            row, col = int(block.row_off), int(block.col_off)
            thumb.add(row, col, rgb)
            cut = ids[::step, ::step]
            small[row // step : row // step + cut.shape[0], col // step : col // step + cut.shape[1]] = cut
    return thumb.rgb, small


def detect(
    image: Path,
    classes: str,
    out_dir: Path,
    root: Path = Path("."),
    model_uri: str | None = None,
    stride: int = 32,
    batch_size: int = 64,
    window_px: int = DEFAULT_WINDOW_PX,
    resample: bool = False,
    min_area_px: int = 1,
    gpkg: bool = False,
) -> dict[str, Any]:
    """Annotate `image` block by block; write the outputs the module docstring lists.

    `resample`: read an image whose pixel size differs from the detector's resampled to it (else
    that is an error); `min_area_px`: regions of fewer pixels are sieved away; `gpkg`: also write
    the polygons as a GeoPackage. Returns the output paths, the polygon count, where the model
    came from (and why, when not the champion), the resampling note or None, the share of each
    class over valid pixels and the largest read in pixels.
    """
    from ms2rgb.tasks.detection.plots import class_colours

    if not 1 <= stride <= WINDOW:
        raise Ms2rgbError(f"--stride {stride} must lie in 1..{WINDOW} so windows overlap or touch")
    if not 1 <= min_area_px <= max_min_px(window_px):
        raise Ms2rgbError(
            f"--min-area {min_area_px} px must lie in 1..{max_min_px(window_px)} (1 keeps every region; the "
            f"sieve reads each block with that many pixels around it, within the window budget {window_px} px)"
        )
    class_names(classes)
    image = Path(image)
    with ImageReader(image) as reader:
        plan_blocks(reader.height, reader.width, window_px, halo=WINDOW - 1, align=WINDOW)  # fails before the load
        model, source, note = choose_detector(root, model_uri)
        resampled = reader.match_pixel_size(training_pixel_size(model), resample)
        blocks = plan_blocks(reader.height, reader.width, window_px, halo=WINDOW - 1, align=WINDOW)
        names, texts = resolve_classes(classes, dict(zip(model.class_names, model.texts)))
        colours = class_colours(names)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = output_paths(out_dir, image.stem, gpkg)
        with staged(list(paths.values())) as temps, TemporaryDirectory(dir=out_dir, prefix=".detect-") as scratch:
            tmp = dict(zip(paths, temps))
            raw, sieved = Path(scratch) / "raw.tif", Path(scratch) / "sieved.tif"
            score = scorer(model, texts)
            rgb, small = write_class_ids(raw, reader, blocks, score, names, colours, stride, batch_size)
            fields = {"class": names, "description": texts}
            package = Path(scratch) / "classes.gpkg" if gpkg else None  # GDAL wants the .gpkg suffix
            sink = PolygonSink(tmp["classes.geojson"], package, reader.transform, reader.crs, fields)
            try:
                counts = polygonize(raw, sink, window_px, MASK_NODATA, min_area_px, sieved)
            finally:
                sink.close()
            if package is not None:
                os.replace(package, tmp["classes.gpkg"])
            to_cog(sieved if min_area_px > 1 else raw, tmp["classes.tif"], categorical=True)
            write_class_names(tmp["classes.tif.aux.xml"], names, colours)
            write_overlay(tmp["overlay.png"], rgb, small, names, colours)  # before sieving: specks are sub-pixel there
        n_valid = max(1, int(counts[: len(names)].sum()))
        return {
            "outputs": {k: str(p) for k, p in paths.items()},
            "polygons": sink.count,
            "model": source,
            "model_note": note,
            "resampled": resampled,
            "shares": {n: round(float(c) / n_valid, 4) for n, c in zip(names, counts)},
            "largest_read_px": max(r * c for r, c in reader.reads),
            "reads": len(reader.reads),
        }
