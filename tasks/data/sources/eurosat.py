"""Convert EuroSAT (MS tifs, optional RGB jpgs) into ms2rgb tiles and a manifest with disjoint splits.

Expected layout (as in the EuroSAT_MS / EuroSAT RGB zips):

    <ms_dir>/<ClassName>/<ClassName>_<n>.tif    13-band uint16, 64x64, with a CRS
    <rgb_dir>/<ClassName>/<ClassName>_<n>.jpg   8-bit RGB of the same location (same stem)

EuroSAT's MS tifs store the bands as B01..B08, B09, B10, B11, B12, B8A: B8A comes LAST, not after B08.
The per-band means of the real tiles show it (file index 8 ~ 732 is the water-vapour band B09, file index
12 ~ 2594 is the NIR-narrow B8A; compare models.bands.BAND_MEAN). Tiles are reordered into S2_BANDS.
"""

from __future__ import annotations

import hashlib
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import rasterio
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.transform import Affine

from ms2rgb.models.bands import RGB_BANDS, S2_BANDS
from ms2rgb.tasks.data.atomic import swap_in_dir
from ms2rgb.tasks.data.classes import SCENE_NAMES
from ms2rgb.tasks.data.geotiff import TILE_SIZE, read_tile, sha256_of, tile_bounds, write_tile
from ms2rgb.tasks.data.manifest import EUROSAT_SPLITS, MANIFEST_NAME, SPLIT_MODALITIES, make_manifest, write_manifest
from ms2rgb.tasks.data.render import render_rgb
from ms2rgb.tasks.errors import DatasetLayoutError, Ms2rgbError, RasterError, UnknownClassError

Progress = Callable[[str], None] | None

EUROSAT_FILE_BAND_ORDER: tuple[str, ...] = (
    "B01",
    "B02",
    "B03",
    "B04",
    "B05",
    "B06",
    "B07",
    "B08",
    "B09",
    "B10",
    "B11",
    "B12",
    "B8A",
)
_LAYOUT = "<ms_dir>/<ClassName>/<ClassName>_<n>.tif with ClassName one of " + ", ".join(SCENE_NAMES)
_PROGRESS_EVERY = 500  # locations


def check_split_fractions(fractions: dict[str, float]) -> dict[str, float]:
    """Validate fractions (known splits, non-negative, summing to 1); missing splits get 0."""
    unknown = [k for k in fractions if k not in EUROSAT_SPLITS]
    if unknown:
        raise Ms2rgbError(f"split_fractions: unknown split(s) {unknown}; EuroSAT can fill {list(EUROSAT_SPLITS)}")
    negative = {k: v for k, v in fractions.items() if v < 0}
    total = sum(fractions.values())
    if negative or abs(total - 1.0) > 1e-6:
        raise Ms2rgbError(f"split_fractions={fractions!r}: fractions must be >= 0 and sum to 1 (sum={total:g})")
    return {k: float(fractions.get(k, 0.0)) for k in EUROSAT_SPLITS}


def assign_splits(
    stems: list[str], fractions: dict[str, float], seed: int, key: str, test: frozenset[str] = frozenset()
) -> dict[str, str]:
    """Deterministically map each location (stem) to one split.

    The stems are sorted first (file-system order must not matter), then permuted by a generator seeded
    from (seed, key) through SHA-256, so the result is stable across runs, machines and Python versions.
    Split sizes come from rounding the cumulative fractions, so they add up to len(stems) exactly.
    Stems in `test` (a given test split, e.g. a published one) go to test; the others share the
    remaining splits in proportion to their fractions.
    """
    if test:
        given = {stem: "test" for stem in stems if stem in test}
        rest = {k: v for k, v in fractions.items() if k != "test"}
        total = sum(rest.values())
        if total <= 0:
            raise Ms2rgbError(f"split_fractions={fractions!r}: with a given test split, another split needs a share")
        others = [stem for stem in stems if stem not in given]
        return given | assign_splits(others, {k: v / total for k, v in rest.items()}, seed, key)
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    ordered = sorted(stems)
    order = [ordered[i] for i in rng.permutation(len(ordered))]
    sizes = split_sizes(list(fractions.values()), len(order))
    splits: dict[str, str] = {}
    start = 0
    for split, size in zip(fractions, sizes):
        splits.update((stem, split) for stem in order[start : start + size])
        start += size
    return splits


def split_sizes(fractions: list[float], n: int) -> list[int]:
    """Locations per split: rounded cumulative fractions (they add up to n exactly), then every split
    with a share but no location takes one from the largest split, when there are enough locations.
    Why: on a small real set (20 tiles per class) a 2 % split rounds to nothing, and the stage that
    needs it (the matcher's pair_test) would stop."""
    bounds = np.rint(np.cumsum(fractions) * n).astype(int)
    bounds[-1] = n  # the fractions sum to 1 only within 1e-6: never drop the last location
    sizes = np.diff(bounds, prepend=0)
    wanted = np.array(fractions) > 0
    if n >= wanted.sum():
        for i in np.flatnonzero(wanted & (sizes == 0)):
            sizes[int(np.argmax(sizes))] -= 1
            sizes[i] = 1
    return [int(v) for v in sizes]


def given_test_stems(source: Path) -> frozenset[str]:
    """The locations of a given test split: a text file of tile names, one per line (any extension,
    e.g. torchgeo's eurosat-test.txt), or a folder whose image files name them."""
    if source.is_dir():
        return frozenset(p.stem for p in source.rglob("*") if p.suffix.lower() in {".tif", ".tiff", ".jpg", ".png"})
    if not source.is_file():
        raise DatasetLayoutError(
            f"{source}: data.eurosat_test_list not found; give a text file of tile names or a folder of tiles"
        )
    names = [line.strip() for line in source.read_text().splitlines() if line.strip() and not line.startswith("#")]
    if not names:
        raise DatasetLayoutError(f"{source}: data.eurosat_test_list names no tile; list one tile name per line")
    return frozenset(Path(name).stem for name in names)


def find_tiles(ms_dir: Path) -> dict[str, list[Path]]:
    """Class name -> its MS tifs, checking the layout and the class names."""
    if not ms_dir.is_dir():
        raise DatasetLayoutError(f"{ms_dir}: EuroSAT MS folder not found; expected {_LAYOUT}")
    tiles: dict[str, list[Path]] = {}
    for folder in sorted(p for p in ms_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if folder.name not in SCENE_NAMES:
            raise UnknownClassError(folder.name, SCENE_NAMES, str(folder))
        tiles[folder.name] = sorted(folder.glob("*.tif"))
    if not any(tiles.values()):
        raise DatasetLayoutError(
            f"{ms_dir}: no EuroSAT tifs found; expected {_LAYOUT} "
            "(unzip EuroSAT_MS.zip and pass the folder holding the class folders)"
        )
    return tiles


def read_eurosat_ms(path: Path, file_band_order: tuple[str, ...]) -> tuple[np.ndarray, Affine, CRS]:
    """One EuroSAT MS tif as (13, 64, 64) uint16 in S2_BANDS order, with its transform and CRS."""
    ms = read_tile(path, expect_bands=len(file_band_order), expect_dtype="uint16")
    if ms.shape[1:] != (TILE_SIZE, TILE_SIZE):
        raise RasterError(
            path,
            f"is {ms.shape[2]}x{ms.shape[1]} px, expected {TILE_SIZE}x{TILE_SIZE}",
            "pass the original EuroSAT_MS tiles",
        )
    with rasterio.open(path) as src:
        crs, transform = src.crs, src.transform
    if crs is None:
        raise RasterError(path, "has no CRS", "use the georeferenced EuroSAT_MS release (its tifs carry a CRS)")
    reorder = [file_band_order.index(b) for b in S2_BANDS]
    return ms[reorder], transform, crs  # (13, 64, 64) in S2_BANDS order


def read_eurosat_rgb(path: Path) -> np.ndarray:
    """One EuroSAT RGB jpg as (3, 64, 64) uint8 (R, G, B = B04, B03, B02)."""
    if not path.exists():
        raise RasterError(
            path,
            "RGB jpg of this MS tile does not exist",
            "pass the EuroSAT RGB folder matching ms_dir, or rgb_dir=None to render RGB from B04/B03/B02",
        )
    try:
        with warnings.catch_warnings():
            # EuroSAT jpgs carry no georeference by design; the MS tile supplies it.
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                rgb = src.read()
    except RasterioError as exc:
        raise RasterError(path, f"cannot be read as an image ({exc})", "re-extract the EuroSAT RGB zip") from exc
    if rgb.shape != (len(RGB_BANDS), TILE_SIZE, TILE_SIZE) or rgb.dtype != np.uint8:
        raise RasterError(
            path,
            f"is {rgb.dtype} of shape {rgb.shape}, expected uint8 (3, 64, 64)",
            "pass the original EuroSAT RGB jpgs",
        )
    return rgb


def _row(stem: str, cls: str, split: str, modality: str, out_root: Path, rel: str, crs: CRS, transform: Affine) -> dict:
    left, bottom, right, top = tile_bounds(transform)
    return {
        "id": f"eurosat-{stem}-{modality}",
        "modality": modality,
        "path": rel,
        "mask_path": None,
        "class": cls,
        "split": split,
        "source": "eurosat",
        "location_id": stem,
        "crs": crs.to_string(),
        "bounds_left": left,
        "bounds_bottom": bottom,
        "bounds_right": right,
        "bounds_top": top,
        "sha256": sha256_of(out_root / rel),
    }


def convert_location(
    ms_path: Path, cls: str, split: str, out_root: Path, rgb_dir: Path | None, file_band_order: tuple[str, ...]
) -> list[dict]:
    """Write the tiles one location's split calls for and return their manifest rows."""
    stem = ms_path.stem
    ms, transform, crs = read_eurosat_ms(ms_path, file_band_order)
    rows = []
    if "ms" in SPLIT_MODALITIES[split]:
        rel = f"tiles/ms/{cls}/{stem}.tif"
        write_tile(out_root / rel, ms, crs, transform, band_names=S2_BANDS)
        rows.append(_row(stem, cls, split, "ms", out_root, rel, crs, transform))
    if "rgb" in SPLIT_MODALITIES[split]:
        # The jpg and the tif show the same 64x64 patch, so the jpg takes the tif's georeference.
        rgb = read_eurosat_rgb(rgb_dir / cls / f"{stem}.jpg") if rgb_dir else render_rgb(ms)
        rel = f"tiles/rgb/{cls}/{stem}.tif"
        write_tile(out_root / rel, rgb, crs, transform, band_names=RGB_BANDS)
        rows.append(_row(stem, cls, split, "rgb", out_root, rel, crs, transform))
    return rows


def ingest_eurosat(
    ms_dir: Path,
    out_root: Path,
    rgb_dir: Path | None,
    split_fractions: dict[str, float],
    seed: int = 0,
    test_stems: frozenset[str] = frozenset(),
    file_band_order: tuple[str, ...] = EUROSAT_FILE_BAND_ORDER,
    progress: Progress = print,
) -> pd.DataFrame:
    """Convert EuroSAT into ms2rgb tiles under out_root/tiles/{ms,rgb}/<Class>/ and write the manifest.

    Args:
        ms_dir: the EuroSAT_MS folder holding one folder per class.
        out_root: data root; manifest paths are relative to it.
        rgb_dir: the EuroSAT RGB folder (jpgs); None renders RGB from B04/B03/B02 (render_rgb).
        split_fractions: fraction of each class's locations per split (params: data.eurosat_split_fractions).
        seed: seeds the per-class permutation; same seed and files give the same splits.
        test_stems: locations (file stems) that form the test split, e.g. a published one (given_test_stems).
        file_band_order: band order inside the tifs (EuroSAT's: B8A last).
        progress: called with progress lines; None for silence.
    """
    ms_dir, out_root = Path(ms_dir), Path(out_root)
    rgb_dir = Path(rgb_dir) if rgb_dir is not None else None
    if sorted(file_band_order) != sorted(S2_BANDS):
        raise Ms2rgbError(f"file_band_order={file_band_order!r} must list each of {list(S2_BANDS)} once")
    fractions = check_split_fractions(split_fractions)
    if rgb_dir is not None and not rgb_dir.is_dir():
        raise DatasetLayoutError(
            f"{rgb_dir}: EuroSAT RGB folder not found; expected "
            "<rgb_dir>/<ClassName>/<ClassName>_<n>.jpg, or pass rgb_dir=None"
        )
    tiles = find_tiles(ms_dir)
    total = sum(map(len, tiles.values()))
    if progress:
        progress(f"eurosat: {total} MS tifs in {len(tiles)} classes; RGB from {rgb_dir or 'B04/B03/B02 (render_rgb)'}")
    # Converted into a sibling and swapped in whole: a bad tif midway loses nothing stored.
    work = out_root.with_name(f".{out_root.name}.partial")
    shutil.rmtree(work, ignore_errors=True)
    work.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    done = 0
    try:
        for cls, paths in tiles.items():
            splits = assign_splits([p.stem for p in paths], fractions, seed, cls, test_stems)
            for path in paths:
                rows += convert_location(path, cls, splits[path.stem], work, rgb_dir, file_band_order)
                done += 1
                if progress and (done % _PROGRESS_EVERY == 0 or done == total):
                    progress(f"eurosat: {done}/{total} locations converted ({len(rows)} tiles)")
        frame = make_manifest(rows)
        write_manifest(frame, work / MANIFEST_NAME)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    swap_in_dir(work, out_root)
    return frame
