"""Spectral-index maps beside the RGB detector's class map, on held-out scene tiles (issue 14).

The detector sees only RGB; with the `scenes` segmentation source its labels were voted from the
MS bands (tasks/data/weak_labels.py). This figure puts, for a few `seg_test` tiles, the indices
those votes read (NDWI, NDVI, NDBI) beside the weak-label mask and the RGB-only prediction, so a
reader sees where the detector follows the spectral evidence and where it cannot. The indices are
read from the index maps the `scenes` source wrote beside each seg_test tile in the segmentation
folder (manifest column `index_path`), not from the scene tiles: evaluate depends on that folder,
not on data/scenes. Synthetic and folder tiles have none; then, or when a file is missing, no
figure is drawn (one printed line says why) rather than a faked one or a failed stage.

Built on `matplotlib.figure.Figure` rather than pyplot (as tasks/detection/plots.py): no GUI
backend and no global figure state, so stages may run in Prefect worker threads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import rasterio
from matplotlib.figure import Figure
from rasterio.errors import RasterioIOError

from ms2rgb.tasks.data.cache import open_split
from ms2rgb.tasks.data.geotiff import TILE_SIZE
from ms2rgb.tasks.data.manifest import MANIFEST_NAME, SEGMENTATION_DIR, read_manifest
from ms2rgb.tasks.detection.plots import class_colours, legend_handles

# index (spectral_indices key; upper-cased, its band's name in an index map) -> (title, diverging
# colour map, fixed value range). The ranges are fixed, not per tile, so that one colour means one
# index value on every row; the maps are chosen so that the surface an index marks shows in its
# natural colour (water blue, green vegetation green, built-up and bare ground brown).
INDEX_PANELS: dict[str, tuple[str, str, tuple[float, float]]] = {
    "ndwi": ("NDWI (G-NIR)/(G+NIR)", "RdBu", (-1.0, 1.0)),
    "ndvi": ("NDVI (NIR-R)/(NIR+R)", "RdYlGn", (-1.0, 1.0)),
    "ndbi": ("NDBI (SWIR1-NIR)/(SWIR1+NIR)", "BrBG_r", (-0.5, 0.5)),
}
PANELS = ("RGB", *(title for title, _, _ in INDEX_PANELS.values()), "weak labels (MS)", "detector (RGB only)")


class NoIndexMaps(Exception):
    """Why the held-out tiles have no index maps to show; the figure is then skipped, never faked."""


def index_tiles(
    root: Path, prepared: Path, split: str, rows: Sequence[int], progress: Callable[[str], None] = print
) -> np.ndarray | None:
    """(len(rows), 3, H, W) float32: the NDWI, NDVI and NDBI maps (INDEX_PANELS order) of these cache
    rows of an RGB detector split, or None, with one line to `progress` saying why, when any is missing.

    The paths come from the segmentation folder's manifest, not the prepared one: that one changes with
    every new pool scene, this one only with the detector's tiles (DVC deps stay as fine as the data)."""
    if not len(rows):
        return None
    try:
        return np.stack([_read_index_map(path) for path in _index_paths(root, prepared, split, rows)])
    except NoIndexMaps as why:
        progress(f"evaluate: no index_maps.png: {why}")
        return None


def _index_paths(root: Path, prepared: Path, split: str, rows: Sequence[int]) -> list[Path]:
    folder = root / SEGMENTATION_DIR
    if not (folder / MANIFEST_NAME).is_file():
        raise NoIndexMaps(f"{folder} has no manifest (synthetic tiles have no MS bands behind them)")
    ids = open_split(prepared, split, "rgb").ids
    paths = read_manifest(folder / MANIFEST_NAME).set_index("id")["index_path"].reindex([ids[i] for i in rows])
    if paths.isna().any():
        raise NoIndexMaps(
            f"{int(paths.isna().sum())} of the first {len(rows)} {split} tiles have no index map "
            "(only data.segmentation.source: scenes writes them)"
        )
    return [folder / p for p in paths]


def _read_index_map(path: Path) -> np.ndarray:
    """(3, H, W) float32 of one index map, its bands picked by name in INDEX_PANELS order."""
    try:
        with rasterio.open(path) as src:
            bands = [src.descriptions.index(key.upper()) + 1 for key in INDEX_PANELS]
            maps = src.read(bands, out_dtype="float32")
    except (RasterioIOError, ValueError) as exc:  # missing or unreadable file, or a band not named
        raise NoIndexMaps(f"{path}: {exc}; rerun `ms2rgb stage prepare` to write it again") from exc
    return maps[:, :TILE_SIZE, :TILE_SIZE]  # as the cache crops its RGB tiles


def index_maps_figure(
    images: np.ndarray, indices: np.ndarray, weak: np.ndarray, preds: np.ndarray, names: Sequence[str]
) -> Figure:
    """One row per tile: RGB | NDWI | NDVI | NDBI | weak-label mask | detector's map.

    `images` (N, 3, H, W) uint8 RGB, `indices` (N, 3, H, W) float32 the same tiles' index maps in
    INDEX_PANELS order (`index_tiles`), `weak` (N, H, W) the weak-label class ids (255 = no data,
    black), `preds` (N, H, W) predicted class ids, `names` the class names (index = id). One colour
    bar under each index column.
    """
    if not (len(images) == len(indices) == len(weak) == len(preds)) or len(images) == 0:
        raise ValueError(
            f"index maps need as many RGB tiles, index maps, masks and predictions (got {len(images)}, "
            f"{len(indices)}, {len(weak)}, {len(preds)}), at least one"
        )
    if indices.shape[1] != len(INDEX_PANELS):
        raise ValueError(f"index maps need {len(INDEX_PANELS)} bands {list(INDEX_PANELS)}, got {indices.shape[1]}")
    colours = np.vstack([class_colours(names), np.zeros((256 - len(names), 3))])  # index 255 -> black
    fig = Figure(figsize=(2.1 * len(PANELS), 2.0 * len(images) + 1.4), layout="constrained")
    axes = fig.subplots(len(images), len(PANELS), squeeze=False)
    for row in range(len(images)):
        axes[row, 0].imshow(images[row].transpose(1, 2, 0), interpolation="nearest")
        for col, (_, cmap, (low, high)) in enumerate(INDEX_PANELS.values(), start=1):
            band = indices[row, col - 1]
            shown = axes[row, col].imshow(band, cmap=cmap, vmin=low, vmax=high, interpolation="nearest")
            if row == len(images) - 1:  # fixed ranges: one bar per column says it for every row
                fig.colorbar(shown, ax=axes[:, col], location="bottom", shrink=0.9, aspect=15)
        axes[row, -2].imshow(colours[weak[row]], interpolation="nearest")
        axes[row, -1].imshow(colours[preds[row]], interpolation="nearest")
    for ax, title in zip(axes[0], PANELS):
        ax.set_title(title, fontsize=8)
    for ax in axes.flat:
        ax.set_axis_off()
    fig.legend(handles=legend_handles(names), loc="outside lower center", ncol=min(5, len(names)), fontsize=8)
    return fig
