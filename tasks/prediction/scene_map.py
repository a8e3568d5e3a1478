"""`ms2rgb predict`: a scene-class map of a GeoTIFF of any size with the RGB student (method A's product).

Input: a 3-band uint8 RGB GeoTIFF or a 13-band uint16 Sentinel-2 L1C GeoTIFF, rendered to RGB the
way the tiles were (`tasks/data/windows.py`); it needs a CRS. It is read block by block, each read
at most `window_px` pixels, so memory follows that budget and not the image.

Cells: the image is cut into 64-px cells (the student's tile size) from its top-left pixel, giving
ceil(H / 64) x ceil(W / 64) cells. Partial cells at the bottom and right borders are **padded**
(the last row / column repeated, as `detect` pads small images) and classified; a cell holding no
valid pixel (all outside the input's data mask) is no data.

Model: by default the registered champion `models:/<prefix>-student@champion` (`tracking.model_prefix` in
the project's params.yaml: `models:/ms2rgb-student@champion` by default); when it cannot be loaded
(no champion alias yet, an unreachable tracking server) the command stops and says how to fix it.
`artifacts/student/model.pt` is used only when asked for (`model_uri="artifacts"`, `--model artifacts`)
or when there is no tracking store at all, and the result says so (`tasks/tracking/champion.py`).
`model_uri` picks a registered version, e.g. `models:/ms2rgb-student/3`.

Pixel size: the image's must be within 10 % of the student's training tiles' (10 m), else the
command stops naming both; `resample=True` (`--resample`) reads it resampled on the fly to 10 m
instead, and cells and outputs are on that grid (`tasks/data/pixel_size.py`).

Outputs in `out_dir`, one pixel per cell (the input's transform scaled by 64, same CRS), the
rasters as Cloud-Optimized GeoTIFFs (internal tiles, overviews; `tasks/data/class_raster.py`):
`<stem>_scenes.tif` (uint8 scene class ids, 255 = no data, a colour table, class names in the
`classes` tag) with `<stem>_scenes.tif.aux.xml` (the class names as GDAL categories and a raster
attribute table, which QGIS shows), `<stem>_scene_probs.tif` (float32 softmax probabilities, one
band per class named after it, NaN = no data) and `<stem>_scenes.png` (the image, the class of
each cell, a legend). They appear together, only when all are complete.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import numpy as np
import torch
from rasterio.transform import Affine
from rasterio.windows import Window
from torch import nn

from ms2rgb.models.bands import RGB_BANDS
from ms2rgb.models.classifier import SceneCNN
from ms2rgb.tasks.data.artifacts import LOCAL_MODEL, model_path
from ms2rgb.tasks.data.class_raster import colour_table, to_cog, write_class_names
from ms2rgb.tasks.data.classes import MASK_NODATA, SCENE_NAMES
from ms2rgb.tasks.data.geotiff import TILE_SIZE
from ms2rgb.tasks.data.pixel_size import training_pixel_size
from ms2rgb.tasks.data.windows import DEFAULT_WINDOW_PX, ImageReader, Thumbnail, create_geotiff, plan_blocks, staged
from ms2rgb.tasks.errors import Ms2rgbError
from ms2rgb.tasks.training.loop import autocast, pick_device
from ms2rgb.tasks.training.store import load_model

CELL = TILE_SIZE  # px per output pixel: the student's tile size
SUFFIXES = {
    "scenes.tif": "scenes.tif",
    "scenes.tif.aux.xml": "scenes.tif.aux.xml",  # the class names, for GIS (tasks/data/class_raster.py)
    "probabilities.tif": "scene_probs.tif",
    "preview.png": "scenes.png",
}


def _one_line(err: BaseException) -> str:
    """The error's message on one line, without its own fix (the caller's message gives one)."""
    text = " ".join(str(err).split()).split(". Fix:")[0] or type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _student_hint(root: Path) -> str:
    from ms2rgb.tasks.tracking.champion import name_hint

    return name_hint(root, "student")


def check_student(model: nn.Module, where: str, root: Path) -> nn.Module:
    """The model in eval mode, if it reads 3-band RGB tiles and scores the scene classes (`root`: the
    project whose registered student a fix names)."""
    if isinstance(model, SceneCNN) and model.bands != RGB_BANDS:
        raise Ms2rgbError(
            f"{where} reads bands {model.bands}, not the RGB bands {RGB_BANDS}; "
            f"pass a version of {_student_hint(root)} (the RGB student)"
        )
    with contextlib.suppress(NotImplementedError):  # a torch.export graph (MLflow's default) is traced in eval mode
        model.eval()
    with torch.no_grad():
        try:
            width = model(torch.zeros(1, len(RGB_BANDS), CELL, CELL)).shape[-1]
        except Exception as err:  # wrong channels or tile size: torch raises RuntimeError, export guards others
            raise Ms2rgbError(
                f"{where} does not take (N, 3, {CELL}, {CELL}) RGB tiles ({_one_line(err)}); "
                f"pass a version of {_student_hint(root)}"
            ) from err
    if width != len(SCENE_NAMES):
        raise Ms2rgbError(
            f"{where} scores {width} classes, not the {len(SCENE_NAMES)} scene classes {SCENE_NAMES}; "
            f"pass a version of {_student_hint(root)}"
        )
    return model


def local_student(root: Path, asked: bool) -> nn.Module:
    """The student stage's model file; `asked`: the user named it (`--model artifacts`)."""
    local = model_path(root, "student")
    if not local.is_file():
        instead = (
            "leave --model out to use the registered champion"
            if asked
            else "set MLFLOW_TRACKING_URI to the store that holds a registered student"
        )
        raise Ms2rgbError(
            f"no student model: {local} does not exist. Fix: run the student stage (`ms2rgb stage student` "
            f"or `ms2rgb run`), or {instead}"
        )
    return check_student(load_model(local, "scene_cnn", "student"), str(local), root)


def load_student(root: Path, model_uri: str | None = None) -> tuple[nn.Module, str, str | None]:
    """(student, where it came from, why the champion was not used or None).

    `model_uri` a registered model: that one, or an error. "artifacts": the student stage's model file.
    None: the champion, or an error naming the store and the fix; the stage's model file only when
    there is no tracking store at all (tasks/tracking/champion.py).
    """
    local = model_path(root, "student")
    if model_uri == LOCAL_MODEL:  # checked before tasks.tracking (MLflow) is imported: it is not needed
        return local_student(root, asked=True), str(local), None
    from ms2rgb.tasks import tracking
    from ms2rgb.tasks.tracking.champion import has_store, load_champion, registered_name, store_uri

    if model_uri is not None:
        try:
            module = tracking.load_registered_module(root, model_uri)
        except Ms2rgbError as err:  # no store, no such name / version / alias, not a torch model
            message = " ".join(str(err).split())
            if "Fix:" not in message:
                name = _student_hint(root)
                message += (
                    f". Fix: use models:/{name}/<version> or models:/{name}@{tracking.CHAMPION} from this "
                    "project's MLflow store, or leave --model out"
                )
            raise Ms2rgbError(f"--model {model_uri!r}: {message}") from err
        return check_student(module, f"--model {model_uri!r}", root), model_uri, None
    if not has_store(root):  # nothing registered anywhere: the stage's file is all there is
        note = f"no MLflow store ({store_uri(root)}), so no champion; used {local}"
        return local_student(root, asked=False), str(local), note
    name = registered_name(root, "student")
    champion = f"models:/{name}@{tracking.CHAMPION}"
    return check_student(load_champion(root, name, local), champion, root), champion, None


@torch.no_grad()
def classify_cells(model: nn.Module, rgb: np.ndarray, device: torch.device, batch_size: int) -> np.ndarray:
    """(K, rows, cols) class probabilities of the 64-px cells of a (3, rows*64, cols*64) uint8 block."""
    _, height, width = rgb.shape
    rows, cols = height // CELL, width // CELL
    cells = rgb.reshape(3, rows, CELL, cols, CELL).transpose(1, 3, 0, 2, 4).reshape(-1, 3, CELL, CELL)
    out = []
    for start in range(0, len(cells), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(cells[start : start + batch_size], dtype=np.float32))
        with autocast(device):
            logits = model(batch.to(device))
        out.append(logits.float().softmax(dim=1).cpu().numpy())
    return np.concatenate(out).reshape(rows, cols, -1).transpose(2, 0, 1)


def scene_colours() -> np.ndarray:
    """(K, 3) RGB floats of the scene classes, the colours `detect` gives the same names."""
    from ms2rgb.tasks.detection.plots import class_colours

    return class_colours(SCENE_NAMES)


def write_preview(path: Path, thumb: Thumbnail, classes: np.ndarray, colours: np.ndarray) -> None:
    """The image beside its scene-class map (one colour per 64-px cell), with a legend of the classes present."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    image = thumb.rgb.transpose(1, 2, 0)
    side = CELL // thumb.factor  # thumbnail px per cell
    cells = np.repeat(np.repeat(classes, side, axis=0), side, axis=1)[: image.shape[0], : image.shape[1]]
    table = np.vstack([colours, np.zeros((256 - len(colours), 3))])
    table[MASK_NODATA] = 1.0  # no data: white
    height, width = cells.shape
    scale = max(1.0, 300 / max(height, width))  # small images are enlarged so the legend stays readable
    dpi, legend = 100, 0.9
    fig = Figure(figsize=(2 * width * scale / dpi + 0.2, height * scale / dpi + legend), dpi=dpi)
    bottom = legend / (height * scale / dpi + legend)
    for i, (picture, title) in enumerate(((image, "image"), (table[cells], "scene class per 64-px cell"))):
        ax = fig.add_axes((i * 0.5 + 0.005, bottom, 0.49, 1 - bottom - 0.06))
        ax.imshow(picture, interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.set_axis_off()
    present = [int(c) for c in np.unique(classes) if c != MASK_NODATA]
    handles = [Patch(color=colours[c], label=SCENE_NAMES[c]) for c in present]
    if (classes == MASK_NODATA).any():
        handles.append(Patch(facecolor="white", edgecolor="grey", label="no data"))
    fig.legend(handles=handles, loc="lower center", ncol=min(5, max(1, len(handles))), fontsize=7, frameon=False)
    fig.savefig(path, dpi=dpi, format="png")


def predict(
    image: Path,
    out_dir: Path,
    root: Path = Path("."),
    model_uri: str | None = None,
    batch_size: int = 256,
    window_px: int = DEFAULT_WINDOW_PX,
    resample: bool = False,
) -> dict[str, Any]:
    """Classify every 64-px cell of `image`; write the class and probability COGs and the preview.

    `resample`: read an image whose pixel size differs from the student's resampled to it (else
    that is an error). Returns the output paths, where the model came from (and why, when not the
    champion), the resampling note or None, the grid, the share of each class over valid cells and
    the largest read in pixels.
    """
    image = Path(image)
    with ImageReader(image) as reader:
        plan_blocks(reader.height, reader.width, window_px, align=CELL)  # a too small budget fails before the load
        model, source, note = load_student(root, model_uri)
        resampled = reader.match_pixel_size(training_pixel_size(model), resample)
        height, width = reader.height, reader.width
        grid = (-(-height // CELL), -(-width // CELL))
        blocks = plan_blocks(height, width, window_px, align=CELL)
        device = pick_device()
        model.to(device)
        colours = scene_colours()
        classes = np.full(grid, MASK_NODATA, np.uint8)  # 1/4096 of the image's pixels, kept for the preview
        thumb = Thumbnail(height, width)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = {kind: out_dir / f"{image.stem}_{suffix}" for kind, suffix in SUFFIXES.items()}
        georef = dict(height=grid[0], width=grid[1], crs=reader.crs, transform=reader.transform @ Affine.scale(CELL))
        names = json.dumps(dict(enumerate(SCENE_NAMES)))
        with staged(list(paths.values())) as temps, TemporaryDirectory(dir=out_dir, prefix=".predict-") as scratch:
            tmp = dict(zip(paths, temps))
            tmp_classes, tmp_probs = Path(scratch) / "classes.tif", Path(scratch) / "probs.tif"  # COGs once whole
            with (
                create_geotiff(
                    tmp_classes,
                    count=1,
                    dtype="uint8",
                    nodata=MASK_NODATA,
                    band_names=["scene class id"],
                    tags={"classes": names, "model": source, "cell_px": str(CELL)},
                    colormap=colour_table(colours),
                    **georef,
                ) as class_tif,
                create_geotiff(
                    tmp_probs,
                    count=len(SCENE_NAMES),
                    dtype="float32",
                    nodata=float("nan"),
                    band_names=SCENE_NAMES,
                    tags={"model": source, "cell_px": str(CELL)},
                    **georef,
                ) as prob_tif,
            ):
                for block in blocks:
                    row, col, rows, cols = int(block.row_off), int(block.col_off), int(block.height), int(block.width)
                    padded_rows, padded_cols = -(-rows // CELL) * CELL, -(-cols // CELL) * CELL
                    rgb, valid = reader.read_padded(row, col, padded_rows, padded_cols)
                    thumb.add(row, col, rgb[:, :rows, :cols])
                    probs = classify_cells(model, rgb, device, batch_size)
                    cell_rows, cell_cols = probs.shape[1:]
                    has_data = valid.reshape(cell_rows, CELL, cell_cols, CELL).any(axis=(1, 3))
                    ids = np.where(has_data, probs.argmax(0), MASK_NODATA).astype(np.uint8)
                    probs[:, ~has_data] = np.nan
                    out = Window(col // CELL, row // CELL, cell_cols, cell_rows)
                    class_tif.write(ids, 1, window=out)
                    prob_tif.write(probs.astype(np.float32), window=out)
                    classes[row // CELL : row // CELL + cell_rows, col // CELL : col // CELL + cell_cols] = ids
            to_cog(tmp_classes, tmp["scenes.tif"], categorical=True)
            write_class_names(tmp["scenes.tif.aux.xml"], SCENE_NAMES, colours)
            to_cog(tmp_probs, tmp["probabilities.tif"], categorical=False)
            write_preview(tmp["preview.png"], thumb, classes, colours)
        valid_cells = classes[classes != MASK_NODATA]
        counts = np.bincount(valid_cells, minlength=len(SCENE_NAMES))
        return {
            "outputs": {kind: str(path) for kind, path in paths.items()},
            "model": source,
            "model_note": note,
            "resampled": resampled,
            "grid": {
                "rows": grid[0],
                "cols": grid[1],
                "cell_px": CELL,
                "nodata_cells": int(classes.size - valid_cells.size),
            },
            "shares": {n: round(float(c) / max(1, valid_cells.size), 4) for n, c in zip(SCENE_NAMES, counts)},
            "largest_read_px": max(r * c for r, c in reader.reads),
            "reads": len(reader.reads),
        }
