"""Ingest one Sentinel-2 scene: resample all 13 bands onto one 10 m grid and cut 64x64 MS tiles.

A scene is one 13-band GeoTIFF, one file per band (JP2 or GeoTIFF at 10/20/60 m, the band named in
the filename, e.g. ``T33UUP_20200101T100031_B8A.jp2`` or ``B02.tif``), or a whole product: a
``.SAFE`` folder, its zip or a STAC item (tasks/data/sources/scene_inputs.py finds the files). Each
band's DNs become reflectance x10000 by the product's offset and quantification
(tasks/data/sources/radiometry.py). Tiles go to ``<out_root>/<scene_id>/tiles/`` with a manifest
and ``ingest.json`` beside them; a failed run leaves a previously stored scene folder untouched.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
import rasterio
from rasterio.crs import CRS
from rasterio.errors import RasterioError
from rasterio.transform import Affine
from rasterio.warp import Resampling, reproject
from rasterio.windows import Window, from_bounds

from ms2rgb.models.bands import S2_BANDS
from ms2rgb.tasks.data.atomic import swap_in_dir
from ms2rgb.tasks.data.clouds import cloud_shares
from ms2rgb.tasks.data.geotiff import PIXEL_SIZE, TILE_SIZE, sha256_of, tile_bounds, write_tile
from ms2rgb.tasks.data.manifest import MANIFEST_NAME, make_manifest, write_manifest
from ms2rgb.tasks.data.sources.band_names import band_from_filename, band_name
from ms2rgb.tasks.data.sources.radiometry import NO_OFFSET, Radiometry
from ms2rgb.tasks.data.sources.remote import REMOTE_GDAL_OPTIONS, is_url
from ms2rgb.tasks.data.sources.scene_inputs import Input, SceneInputs, resolve_inputs
from ms2rgb.tasks.data.sources.scene_inputs import default_scene_id as default_scene_id
from ms2rgb.tasks.errors import Ms2rgbError, RasterError, SceneAlreadyInPool

Progress = Callable[[str], None] | None
Datasets = dict[Input, rasterio.DatasetReader]
INGEST_REPORT = "ingest.json"  # in each scene folder: tiles kept and skipped by reason, radiometry applied
_SCENE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_RES_TOL = 1e-6  # metres; pixel sizes are compared with this tolerance


@dataclass(frozen=True)
class BandSource:
    """Where one Sentinel-2 band lives: a file and the 1-based band index inside it."""

    band: str
    path: Input  # a local file, a /vsizip/ path or a URL
    index: int
    crs: CRS | None
    transform: Affine
    width: int
    height: int
    nodata: float | None

    @property
    def res(self) -> float:
        """Pixel size in CRS units (metres for UTM)."""
        return abs(self.transform.a)


@dataclass(frozen=True)
class Grid:
    """The 10 m target grid every band is resampled onto."""

    crs: CRS
    transform: Affine
    width: int
    height: int


def _open(path: Input, stack: ExitStack) -> rasterio.DatasetReader:
    """Open a raster, raising RasterError that names the file for missing or unreadable ones."""
    if isinstance(path, Path) and not path.exists():
        raise RasterError(
            path,
            "file does not exist",
            "check the path; pass the scene's band files (e.g. *_B01.jp2 ... *_B12.jp2) or one 13-band GeoTIFF",
        )
    remote = is_url(path)
    try:
        with rasterio.Env(**(REMOTE_GDAL_OPTIONS if remote else {})):
            return stack.enter_context(rasterio.open(path))
    except RasterioError as exc:
        fix = (
            "check that the URL serves the band file and answers HTTP Range requests (GDAL reads it in place)"
            if remote
            else "the file is corrupt or truncated; re-download or re-export it"
        )
        raise RasterError(path, f"cannot be opened as a raster ({exc})", fix) from exc


def _source(band: str, path: Input, index: int, src: rasterio.DatasetReader) -> BandSource:
    return BandSource(band, path, index, src.crs, src.transform, src.width, src.height, src.nodata)


def _multiband_sources(path: Input, src: rasterio.DatasetReader) -> list[BandSource]:
    """The 13 bands of one file: named by band descriptions if all carry a band name, else S2 order."""
    if src.count != len(S2_BANDS):
        raise RasterError(
            path,
            f"has {src.count} bands, expected {len(S2_BANDS)} ({', '.join(S2_BANDS)})",
            "pass a 13-band Sentinel-2 GeoTIFF, or the per-band files instead",
        )
    described = [band_name(d) if d else None for d in src.descriptions]
    names = [name for name in described if name is not None]
    if len(names) != len(described):  # no (or not all) band descriptions: the file must be in S2_BANDS order
        names = list(S2_BANDS)
    return [_source(name, path, i, src) for i, name in enumerate(names, start=1)]


def _collect(scene: SceneInputs, stack: ExitStack) -> tuple[dict[str, BandSource], Datasets]:
    """Open the inputs and map each of the 13 bands to its source, checking for gaps and duplicates."""
    files = scene.files
    datasets = {path: _open(path, stack) for path in files}
    if scene.bands is not None:  # a product named its band files
        return _unique([_product_band(band, path, datasets[path]) for band, path in scene.bands.items()]), datasets
    if len(datasets) == 1 and datasets[files[0]].count != 1:
        return _unique(_multiband_sources(files[0], datasets[files[0]])), datasets
    sources = []
    for path, src in datasets.items():
        band = band_from_filename(PurePosixPath(str(path)))
        if src.count != 1 or band is None:
            problem = (
                f"has {src.count} bands among several inputs" if src.count != 1 else "has no band name in its filename"
            )
            raise RasterError(
                path, problem, "pass one file per band, named like *_B8A.jp2, or a single 13-band GeoTIFF on its own"
            )
        sources.append(_source(band, path, 1, src))
    return _unique(sources), datasets


def _product_band(band: str, path: Input, src: rasterio.DatasetReader) -> BandSource:
    if src.count != 1:
        raise RasterError(path, f"holds {src.count} bands, expected one (band {band})", "re-download the product")
    return _source(band, path, 1, src)


def _unique(sources: list[BandSource]) -> dict[str, BandSource]:
    """Band -> source, raising on a duplicate band or on any of the 13 bands missing."""
    by_band: dict[str, BandSource] = {}
    for s in sources:
        if s.band in by_band:
            first = by_band[s.band]
            raise RasterError(
                s.path,
                f"duplicate band {s.band}: also in {first.path} (band {first.index})",
                "pass each band exactly once",
            )
        by_band[s.band] = s
    missing = [b for b in S2_BANDS if b not in by_band]
    if missing:
        where = sorted({str(s.path) for s in sources})
        raise RasterError(
            ", ".join(where),
            f"scene lacks bands {missing} of the 13 Sentinel-2 bands",
            "add the files of the missing bands (names ending in _<band>.jp2/.tif)",
        )
    return {b: by_band[b] for b in S2_BANDS}


def _target_grid(sources: dict[str, BandSource]) -> Grid:
    """The grid of the first 10 m band; if no band is at 10 m, a 10 m grid over the first band."""
    missing_crs = [s for s in sources.values() if s.crs is None]
    if missing_crs:
        raise RasterError(missing_crs[0].path, "has no CRS", "ingest georeferenced files (L1C JP2s have one)")
    first = next(iter(sources.values()))
    for s in sources.values():
        if s.crs != first.crs:
            raise RasterError(
                s.path,
                f"CRS {s.crs} differs from {first.crs} of {first.path}",
                "all bands of a scene must share one CRS; reproject them or pick the files of one tile",
            )
    ten = [s for s in sources.values() if abs(s.res - PIXEL_SIZE) < _RES_TOL]
    if ten:
        s = ten[0]
        return Grid(s.crs, s.transform, s.width, s.height)
    width = int(round(first.width * first.res / PIXEL_SIZE))
    height = int(round(first.height * abs(first.transform.e) / PIXEL_SIZE))
    transform = Affine(PIXEL_SIZE, 0.0, first.transform.c, 0.0, -PIXEL_SIZE, first.transform.f)
    return Grid(first.crs, transform, width, height)


def window_transform(window: Window, transform: Affine) -> Affine:
    """Georeference of a window; `@` because rasterio.windows.transform warns about Affine `*`."""
    return transform @ Affine.translation(window.col_off, window.row_off)


def _source_window(source: BandSource, bounds: tuple[float, float, float, float]) -> Window | None:
    """Whole-pixel source window covering bounds, clipped to the file; None if they do not overlap."""
    win = from_bounds(*bounds, transform=source.transform)
    # Two source pixels of margin so the bilinear kernel at the strip's edge has its neighbours.
    col0 = max(math.floor(win.col_off) - 2, 0)
    row0 = max(math.floor(win.row_off) - 2, 0)
    col1 = min(math.ceil(win.col_off + win.width) + 2, source.width)
    row1 = min(math.ceil(win.row_off + win.height) + 2, source.height)
    if col1 <= col0 or row1 <= row0:
        return None
    return Window(col0, row0, col1 - col0, row1 - row0)


def _read_strip(
    source: BandSource, src: rasterio.DatasetReader, grid: Grid, row0: int, radiometry: Radiometry
) -> np.ndarray:
    """One band over grid rows row0..row0+TILE_SIZE as float32 reflectance x10000, NaN where not covered.

    The offset is applied to the DNs before resampling, so a no-data DN (0) is known as such and a
    coarse band of an offset product resamples exactly as the same band of an unshifted one.

    Reads the source window explicitly: GDAL's warper, handed a band, skips unreadable blocks of a
    truncated file silently, while an explicit read raises.
    """
    dst_transform = window_transform(Window(0, row0, grid.width, TILE_SIZE), grid.transform)
    left, top = dst_transform.c, dst_transform.f
    bounds = (left, top - TILE_SIZE * PIXEL_SIZE, left + grid.width * PIXEL_SIZE, top)
    out = np.full((TILE_SIZE, grid.width), np.nan, dtype=np.float32)
    win = _source_window(source, bounds)
    if win is None:  # the band does not reach this strip: it stays NaN (invalid)
        return out
    try:
        data = src.read(source.index, window=win, out_dtype="float32")
    except RasterioError as exc:
        # rasterio's own message only says "see previous exception": show GDAL's reason instead.
        raise RasterError(
            source.path,
            f"band {source.band} cannot be read ({exc.__cause__ or exc})",
            "the file is corrupt or truncated; re-download or re-export it",
        ) from exc
    data = radiometry.apply(source.band, data)
    # Coarser 20/60 m bands are upsampled bilinearly: nearest would keep 2x2/6x6 blocks with hard
    # steps (edges no real 10 m image has), and cubic overshoots near bright/dark edges, inventing
    # reflectances. 10 m bands use nearest so they are copied bit-exactly on the shared grid.
    coarse = source.res > PIXEL_SIZE + _RES_TOL
    reproject(
        data,
        out,
        src_transform=window_transform(win, source.transform),
        src_crs=source.crs,
        src_nodata=source.nodata,
        dst_transform=dst_transform,
        dst_crs=grid.crs,
        dst_nodata=np.nan,
        resampling=Resampling.bilinear if coarse else Resampling.nearest,
    )
    return out


@dataclass
class Skipped:
    """Tiles left out of a scene, by reason (written to <scene>/ingest.json, summed in prepare's report)."""

    invalid: int = 0  # valid share below min_valid
    cloudy: int = 0  # cloud share above max_cloud_share


def _tile_rows(
    scene_id: str, grid: Grid, strips: list[np.ndarray], row: int, tiles_dir: Path, limits: tuple[float, float]
) -> tuple[list[dict], Skipped]:
    """Write the valid, clear tiles of one strip; return their manifest rows and what was skipped."""
    min_valid, max_cloud_share = limits
    stack = np.stack(strips)  # (13, TILE_SIZE, W)
    valid = np.all(np.isfinite(stack) & (stack != 0), axis=0)  # (TILE_SIZE, W)
    ms = np.clip(np.rint(np.nan_to_num(stack, nan=0.0)), 0, np.iinfo(np.uint16).max).astype(np.uint16)
    n_cols = grid.width // TILE_SIZE
    tiles = ms[:, :, : n_cols * TILE_SIZE].reshape(13, TILE_SIZE, n_cols, TILE_SIZE).transpose(2, 0, 1, 3)
    clouds = cloud_shares(tiles)  # (n_cols,)
    rows, skipped = [], Skipped()
    for col in range(n_cols):
        cols = slice(col * TILE_SIZE, (col + 1) * TILE_SIZE)
        if valid[:, cols].mean() < min_valid:
            skipped.invalid += 1
            continue
        if clouds[col] > max_cloud_share:
            skipped.cloudy += 1
            continue
        location = f"{scene_id}_r{row}_c{col}"
        path = tiles_dir / f"{location}.tif"
        transform = window_transform(Window(col * TILE_SIZE, row * TILE_SIZE, TILE_SIZE, TILE_SIZE), grid.transform)
        write_tile(path, ms[:, :, cols], grid.crs, transform, band_names=S2_BANDS)
        left, bottom, right, top = tile_bounds(transform)
        rows.append(
            {
                "id": f"{location}-ms",
                "modality": "ms",
                "path": f"{scene_id}/tiles/{path.name}",
                "mask_path": None,
                "class": None,
                "split": "ms_pool",
                "source": f"scene:{scene_id}",
                "location_id": location,
                "crs": grid.crs.to_string(),
                "bounds_left": left,
                "bounds_bottom": bottom,
                "bounds_right": right,
                "bounds_top": top,
                "sha256": sha256_of(path),
                "cloud_share": float(clouds[col]),
            }
        )
    return rows, skipped


def _write_tiles(
    scene_id: str,
    sources: dict[str, BandSource],
    datasets: Datasets,
    radiometry: Radiometry,
    grid: Grid,
    work_dir: Path,
    limits: tuple[float, float],
    progress: Progress,
) -> tuple[pd.DataFrame, Skipped]:
    """Resample strip by strip (memory stays ~13 x 64 rows even for a full 10980 px tile) and tile.
    `limits`: (min_valid, max_cloud_share)."""
    n_rows, n_cols = grid.height // TILE_SIZE, grid.width // TILE_SIZE
    if n_rows == 0 or n_cols == 0:
        raise RasterError(
            next(iter(sources.values())).path,
            f"scene is {grid.width}x{grid.height} px at 10 m, smaller than one {TILE_SIZE}x{TILE_SIZE} tile",
            "ingest a larger scene or crop",
        )
    rows: list[dict] = []
    skipped = Skipped()
    for row in range(n_rows):
        strips = [_read_strip(s, datasets[s.path], grid, row * TILE_SIZE, radiometry) for s in sources.values()]
        new_rows, new = _tile_rows(scene_id, grid, strips, row, work_dir / "tiles", limits)
        rows += new_rows
        skipped.invalid, skipped.cloudy = skipped.invalid + new.invalid, skipped.cloudy + new.cloudy
        if progress and ((row + 1) % 5 == 0 or row + 1 == n_rows):
            left_out = skipped.invalid + skipped.cloudy
            progress(f"{scene_id}: tile row {row + 1}/{n_rows}: {len(rows)} written, {left_out} skipped")
    min_valid, max_cloud_share = limits
    if not rows:
        raise Ms2rgbError(
            f"{scene_id}: no tile kept: {skipped.invalid} have a valid share below min_valid={min_valid} "
            f"(valid = non-zero and not NaN in all 13 bands), {skipped.cloudy} a cloud share above "
            f"data.max_cloud_share={max_cloud_share}; check that the files cover the same area, or take a "
            "clearer scene (or raise data.max_cloud_share)"
        )
    if progress:
        progress(
            f"{scene_id}: {len(rows)} tiles written; skipped {skipped.invalid} (valid share < {min_valid}) "
            f"and {skipped.cloudy} (cloud share > {max_cloud_share}, s2cloudless)"
        )
    return make_manifest(rows), skipped


def _pool_hashes(out_root: Path, except_scene: str) -> dict[str, str]:
    """sha256 -> scene id of every tile already ingested (the scene being replaced excluded)."""
    known: dict[str, str] = {}
    for manifest in sorted(out_root.glob(f"*/{MANIFEST_NAME}")):
        if manifest.parent.name != except_scene:
            known.update(dict.fromkeys(pd.read_parquet(manifest, columns=["sha256"])["sha256"], manifest.parent.name))
    return known


def _drop_known_tiles(
    frame: pd.DataFrame, out_root: Path, scene_id: str, work_dir: Path, progress: Progress
) -> pd.DataFrame:
    """Refuse tiles whose content is already in the pool, under any scene id; refuse the scene when
    nothing new is left (ingesting the same scene twice would double its weight in the pool)."""
    known = _pool_hashes(out_root, scene_id)
    dup = frame["sha256"].isin(list(known))
    if dup.all():
        owners = sorted({known[h] for h in frame["sha256"]})
        raise SceneAlreadyInPool(
            f"{scene_id}: all {len(frame)} tiles are already in the pool (scene(s) {owners}); "
            "nothing was added. Fix: nothing to do, or remove that scene folder first to re-ingest"
        )
    if dup.any():
        for path in frame.loc[dup, "path"]:
            (work_dir / "tiles" / Path(path).name).unlink(missing_ok=True)
        if progress:
            progress(f"{scene_id}: {int(dup.sum())} tile(s) already in the pool were left out")
    return frame.loc[~dup].reset_index(drop=True)


@dataclass
class CutScene:
    """A scene cut into tiles in a hidden work folder under the pool, not yet part of it: what
    :func:`cut_scene` hands to :func:`commit_scene` (possibly from another process)."""

    scene_id: str
    work_dir: Path
    frame: pd.DataFrame
    skipped: Skipped
    radiometry: dict
    max_cloud_share: float


def ingest_scene(
    inputs: Sequence[Input],
    out_root: Path,
    scene_id: str | None = None,
    min_valid: float = 1.0,
    progress: Progress = print,
    max_cloud_share: float = 1.0,
    radiometry: Radiometry = NO_OFFSET,
) -> pd.DataFrame:
    """Cut one Sentinel-2 scene into 13-band 64x64 MS tiles at 10 m and write its manifest.

    Args:
        inputs: one 13-band GeoTIFF, or one file per band (JP2/GeoTIFF, band named in the filename),
            or a folder holding such band files; or one product: a .SAFE folder, its zip, a STAC
            item (.json path or URL) or a folder holding one item and its assets.
        out_root: data root; tiles go to ``<out_root>/<scene_id>/tiles/`` and the manifest to
            ``<out_root>/<scene_id>/manifest.parquet`` (paths in it relative to out_root).
        scene_id: folder and id prefix; by default the product's name, else derived from the filenames
            (see default_scene_id).
        min_valid: tiles with a smaller share of valid pixels (non-zero, non-NaN in all bands) are skipped.
        progress: called with progress lines; None for silence.
        max_cloud_share: tiles with a larger share of cloud (s2cloudless, tasks/data/clouds.py) are skipped
            (params: data.max_cloud_share).
        radiometry: how DNs of inputs whose metadata says nothing (band files, GeoTIFFs) become
            reflectance x10000 (radiometry.given_offset: `--offset` or data.radiometric_offset);
            a product's own metadata takes precedence.

    Returns:
        The manifest (tasks.manifest.COLUMNS), split "ms_pool", unlabelled.
    """
    cut = cut_scene(inputs, out_root, scene_id, min_valid, progress, max_cloud_share, radiometry)
    return commit_scene(cut, out_root, progress)


def cut_scene(
    inputs: Sequence[Input],
    out_root: Path,
    scene_id: str | None = None,
    min_valid: float = 1.0,
    progress: Progress = print,
    max_cloud_share: float = 1.0,
    radiometry: Radiometry = NO_OFFSET,
) -> CutScene:
    """The reading, tiling and cloud scoring of :func:`ingest_scene` (same arguments): tiles written to a
    work folder under ``out_root``, nothing added to the pool. Scenes can be cut side by side; their
    commits then go one after another, each checked against the pool as the ones before left it."""
    if not 0.0 <= min_valid <= 1.0:
        raise Ms2rgbError(f"ingest_scene: min_valid={min_valid!r} must lie in [0, 1]")
    scene = resolve_inputs(inputs, radiometry)
    scene_id = scene_id or scene.name
    if not _SCENE_ID.match(scene_id):
        raise Ms2rgbError(
            f"ingest_scene: scene_id={scene_id!r} is not a safe folder name; use letters, digits, '_', '-' and '.'"
        )
    out_root = Path(out_root)
    with ExitStack() as stack:
        sources, datasets = _collect(scene, stack)
        grid = _target_grid(sources)
        if progress:
            for s in sources.values():
                name = PurePosixPath(str(s.path)).name
                progress(f"{scene_id}: {s.band} <- {name} band {s.index} ({s.res:g} m, {s.width}x{s.height} px)")
            progress(f"{scene_id}: radiometry: {scene.radiometry.describe()}")
        out_root.mkdir(parents=True, exist_ok=True)
        work_dir = Path(tempfile.mkdtemp(prefix=f".{scene_id}.partial-", dir=out_root))
        try:
            limits = (min_valid, max_cloud_share)
            frame, skipped = _write_tiles(
                scene_id, sources, datasets, scene.radiometry, grid, work_dir, limits, progress
            )
        except BaseException:
            shutil.rmtree(work_dir, ignore_errors=True)
            raise
    return CutScene(scene_id, work_dir, frame, skipped, scene.radiometry.report(), max_cloud_share)


def commit_scene(cut: CutScene, out_root: Path, progress: Progress = print) -> pd.DataFrame:
    """Put a cut scene into the pool as ``<out_root>/<scene_id>``, without the tiles the pool already
    holds (:class:`SceneAlreadyInPool` when that is all of them); the work folder goes either way."""
    try:
        frame = _drop_known_tiles(cut.frame, Path(out_root), cut.scene_id, cut.work_dir, progress)
        write_manifest(frame, cut.work_dir / MANIFEST_NAME)
        summary = {"tiles": len(frame), **asdict(cut.skipped), "max_cloud_share": cut.max_cloud_share}
        summary["radiometry"] = cut.radiometry
        (cut.work_dir / INGEST_REPORT).write_text(json.dumps(summary) + "\n")
        swap_in_dir(cut.work_dir, Path(out_root) / cut.scene_id)
    finally:
        shutil.rmtree(cut.work_dir, ignore_errors=True)  # no-op after a successful commit
    return frame
