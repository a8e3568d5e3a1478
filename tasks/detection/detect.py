"""`ms2rgb detect`: a land-cover class map of a GeoTIFF of any size with the tuned detector.

Input: a 3-band uint8 RGB GeoTIFF (bands red, green, blue — EuroSAT's / our tiles' B04, B03,
B02 rendering) or a 13-band uint16 Sentinel-2 L1C GeoTIFF, which is rendered to RGB exactly
as the training tiles were (``tasks.render.render_rgb``; band descriptions, when they name
all 13 bands, give the order). It needs a CRS. Classes: land-cover surface names
(``crop``, ``water``, ...), scene names (``River`` -> its description) or free descriptions
of two or more words (``"red tiled roofs"``); one unknown word is an error.

The image is scored in 64-px windows (the tiles' size) with overlap; each pixel gets the mean
of the logits of every window covering it, which hides window seams. The logits of the whole
image are held in memory: K x H x W float32 (9 classes on 5000 x 5000 px is about 900 MB).

Outputs in ``out_dir``: ``<stem>_classes.tif`` (uint8 class ids, 255 = no data, same CRS and
transform, a colour table), ``<stem>_overlay.png`` (image, class colours, legend) and
``<stem>_classes.geojson`` (one polygon per connected region, WGS84 as RFC 7946 requires).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.features
import rasterio.warp
import torch
from rasterio.errors import RasterioIOError

from ms2rgb.models.bands import S2_BANDS
from ms2rgb.tasks.data.classes import MASK_NODATA, SCENE_CLASSES, SURFACE_CLASSES
from ms2rgb.tasks.data.render import render_rgb
from ms2rgb.tasks.detection.model import load_detector, tokenizer_for
from ms2rgb.tasks.errors import Ms2rgbError, RasterError, UnknownClassError
from ms2rgb.tasks.training.loop import autocast, pick_device

WINDOW = 64
INPUT_FIX = (
    "give a 3-band uint8 RGB GeoTIFF (red, green, blue) or a 13-band uint16 Sentinel-2 L1C GeoTIFF "
    "(bands B01..B12 with B8A after B08)"
)


def _key(name: str) -> str:
    return name.lower().replace(" ", "").replace("_", "")


def resolve_classes(spec: str) -> tuple[list[str], list[str]]:
    """Comma-separated class names -> (names, texts the CLIP reads). See the module docstring."""
    names = [part.strip() for part in spec.split(",") if part.strip()]
    valid = list(SURFACE_CLASSES) + list(SCENE_CLASSES)
    if not names:
        raise Ms2rgbError(
            f"--classes {spec!r} names no class; give comma-separated names such as "
            f"'water,forest,roof' (known names: {valid}) or descriptions of 2+ words"
        )
    lookup = {_key(n): d for n, d in SCENE_CLASSES.items()} | {_key(n): d for n, d in SURFACE_CLASSES.items()}
    texts = []
    for name in names:
        if _key(name) in lookup:
            texts.append(lookup[_key(name)])
        elif len(name.split()) > 1:
            texts.append(name)  # a free description is read as it is
        else:
            raise UnknownClassError(name, valid, "--classes (free descriptions need two or more words)")
    repeated = sorted({n for n in names if [_key(m) for m in names].count(_key(n)) > 1})
    if repeated:
        raise Ms2rgbError(f"--classes lists {repeated} more than once; name each class once")
    return names, texts


def read_image(path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(RGB uint8 (3, H, W), valid-pixel mask (H, W), georeference) of an RGB or 13-band MS GeoTIFF."""
    if not path.is_file():
        raise RasterError(path, "file does not exist", "check the path of the image to annotate")
    try:
        with rasterio.open(path) as src:
            array, valid = src.read(), src.dataset_mask() > 0
            geo = {"crs": src.crs, "transform": src.transform, "descriptions": src.descriptions}
    except RasterioIOError as exc:
        raise RasterError(path, f"cannot be read as a raster ({exc})", INPUT_FIX) from exc
    if geo["crs"] is None:
        raise RasterError(
            path,
            "has no CRS",
            "georeference it first, e.g. gdal_edit.py -a_srs EPSG:32633 "
            "-a_ullr ... (outputs must share the input's georeference)",
        )
    if array.shape[0] == 3 and array.dtype == np.uint8:
        return array, valid, geo
    if array.shape[0] == len(S2_BANDS) and array.dtype == np.uint16:
        named = tuple(d or "" for d in geo["descriptions"])
        return render_rgb(array, named if set(named) == set(S2_BANDS) else S2_BANDS), valid, geo
    raise RasterError(path, f"has {array.shape[0]} band(s) of {array.dtype}", INPUT_FIX)


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Window offsets covering 0..size with the last window flush with the end."""
    if size <= window:
        return [0]
    starts = list(range(0, size - window + 1, stride))
    return starts if starts[-1] == size - window else starts + [size - window]


@torch.no_grad()
def sliding_logits(
    score: Any, rgb: np.ndarray, n_classes: int, stride: int, batch_size: int, device: torch.device
) -> np.ndarray:
    """Mean logits (K, H, W) of 64-px windows; images smaller than a window are edge-padded."""
    height, width = rgb.shape[1:]
    padded = np.pad(rgb, ((0, 0), (0, max(0, WINDOW - height)), (0, max(0, WINDOW - width))), mode="edge")
    ph, pw = padded.shape[1:]
    acc = np.zeros((n_classes, ph, pw), np.float32)
    hits = np.zeros((ph, pw), np.float32)
    corners = [(r, c) for r in window_starts(ph, WINDOW, stride) for c in window_starts(pw, WINDOW, stride)]
    for i in range(0, len(corners), batch_size):
        chunk = corners[i : i + batch_size]
        tiles = torch.from_numpy(np.stack([padded[:, r : r + WINDOW, c : c + WINDOW] for r, c in chunk]))
        with autocast(device):
            logits = score(tiles.to(device)).float().cpu().numpy()  # (B, K, 64, 64)
        for (r, c), tile_logits in zip(chunk, logits):
            acc[:, r : r + WINDOW, c : c + WINDOW] += tile_logits
            hits[r : r + WINDOW, c : c + WINDOW] += 1
    return (acc / hits)[:, :height, :width]


def write_classes_tif(
    path: Path, classes: np.ndarray, geo: dict[str, Any], names: list[str], colours: np.ndarray
) -> None:
    """uint8 class ids with the input's CRS/transform, 255 as nodata, a colour table and the names."""
    profile = dict(
        driver="GTiff",
        width=classes.shape[1],
        height=classes.shape[0],
        count=1,
        dtype="uint8",
        crs=geo["crs"],
        transform=geo["transform"],
        nodata=MASK_NODATA,
        compress="deflate",
    )
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(classes, 1)
        dst.set_band_description(1, "class id")
        dst.update_tags(classes=json.dumps(dict(enumerate(names))))
        dst.write_colormap(1, {i: tuple(int(v * 255) for v in c) + (255,) for i, c in enumerate(colours)})


def write_geojson(path: Path, classes: np.ndarray, geo: dict[str, Any], names: list[str], texts: list[str]) -> int:
    """Polygons of connected same-class regions, reprojected to WGS84; returns how many."""
    shapes = list(rasterio.features.shapes(classes, mask=classes != MASK_NODATA, transform=geo["transform"]))
    geometries = rasterio.warp.transform_geom(geo["crs"], "EPSG:4326", [g for g, _ in shapes]) if shapes else []
    features = [
        {
            "type": "Feature",
            "geometry": geometry,
            "properties": {"class_id": int(value), "class": names[int(value)], "description": texts[int(value)]},
        }
        for geometry, (_, value) in zip(geometries, shapes)
    ]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return len(features)


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
    fig.savefig(path, dpi=dpi)


def detect(
    image: Path,
    classes: str,
    out_dir: Path,
    root: Path = Path("."),
    model_uri: str | None = None,
    stride: int = 32,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Annotate `image`; write the class GeoTIFF, overlay PNG and GeoJSON; return paths and class shares."""
    from ms2rgb.tasks.detection.plots import class_colours

    if not 1 <= stride <= WINDOW:
        raise Ms2rgbError(f"--stride {stride} must lie in 1..{WINDOW} so windows overlap or touch")
    names, texts = resolve_classes(classes)
    rgb, valid, geo = read_image(image)
    device = pick_device()
    model, source = load_detector(root, model_uri)
    model.to(device).eval()
    tokens = tokenizer_for(model)(texts).to(device)
    logits = sliding_logits(lambda x: model.logits_for(x, tokens), rgb, len(names), stride, batch_size, device)
    class_ids = np.where(valid, logits.argmax(0), MASK_NODATA).astype(np.uint8)
    out_dir.mkdir(parents=True, exist_ok=True)
    colours = class_colours(names)
    paths = {kind: out_dir / f"{image.stem}_{kind}" for kind in ("classes.tif", "overlay.png", "classes.geojson")}
    write_classes_tif(paths["classes.tif"], class_ids, geo, names, colours)
    write_overlay(paths["overlay.png"], rgb, class_ids, names, colours)
    polygons = write_geojson(paths["classes.geojson"], class_ids, geo, names, texts)
    counts = np.bincount(class_ids[valid], minlength=len(names))
    return {
        "outputs": {k: str(p) for k, p in paths.items()},
        "polygons": polygons,
        "model": source,
        "shares": {n: round(float(c) / max(1, valid.sum()), 4) for n, c in zip(names, counts)},
    }
