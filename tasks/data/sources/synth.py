"""`ms2rgb data synth`: the embedded default data set, generated from a seed.

Writes georeferenced GeoTIFFs in EuroSAT's folder layout (one folder per class) for each
modality, per-pixel land-cover masks for the detector's splits, and a manifest. See README
"Data model".
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from rasterio.crs import CRS
from rasterio.transform import from_origin

from ms2rgb.models.bands import RGB_BANDS, S2_BANDS
from ms2rgb.tasks.config import SynthConfig
from ms2rgb.tasks.data.classes import SCENE_NAMES
from ms2rgb.tasks.data.geotiff import PIXEL_SIZE, TILE_SIZE, sha256_of, tile_bounds, write_tile
from ms2rgb.tasks.data.manifest import (
    MANIFEST_NAME,
    SEGMENTATION_SPLITS,
    SPLIT_MODALITIES,
    make_manifest,
    write_manifest,
)
from ms2rgb.tasks.data.render import render_rgb
from ms2rgb.tasks.data.sources.spectra import surface_spectra
from ms2rgb.tasks.data.sources.synth_scene import render_location


def _location_transform(index: int, origin: tuple[float, float] = (400000.0, 5200000.0)):
    # Locations sit on a sparse grid, one tile apart, so no two tiles overlap.
    col, row = index % 200, index // 200
    step = 2 * TILE_SIZE * PIXEL_SIZE
    return from_origin(origin[0] + col * step, origin[1] - row * step, PIXEL_SIZE, PIXEL_SIZE)


def _rows_for(
    out: Path, loc_id: str, scene_class: str, split: str, transform, crs: CRS, ms: np.ndarray, mask: np.ndarray
) -> list[dict]:
    # Only the detector reads masks. Scene-classification tiles go without, as EuroSAT's do: 5820
    # fewer files to write, decode, hash and version on the default (40 % of them).
    mask_rel = Path("tiles/mask") / scene_class / f"{loc_id}.tif" if split in SEGMENTATION_SPLITS else None
    if mask_rel is not None:
        write_tile(out / mask_rel, mask[None], crs, transform, ("surface",))
    rows = []
    for modality in SPLIT_MODALITIES[split]:
        rel = Path("tiles") / modality / scene_class / f"{loc_id}.tif"
        array, names = (ms, S2_BANDS) if modality == "ms" else (render_rgb(ms), RGB_BANDS)
        write_tile(out / rel, array, crs, transform, names)
        left, bottom, right, top = tile_bounds(transform)
        rows.append(
            dict(
                id=f"{loc_id}-{modality}",
                modality=modality,
                path=rel.as_posix(),
                mask_path=mask_rel.as_posix() if mask_rel is not None else None,
                **{"class": scene_class},
                split=split,
                source="synth",
                location_id=loc_id,
                crs=crs.to_string(),
                bounds_left=left,
                bounds_bottom=bottom,
                bounds_right=right,
                bounds_top=top,
                sha256=sha256_of(out / rel),
            )
        )
    return rows


def generate(out: Path, cfg: SynthConfig, seed: int, progress: Callable[[str], None] = print) -> Path:
    """Write the synthetic data set under `out` and return its manifest path."""
    spectra = surface_spectra(cfg.rgb_ambiguity)
    crs = CRS.from_string(cfg.crs)
    total = len(SCENE_NAMES) * sum(cfg.per_class.values())
    rows: list[dict] = []
    index = 0
    for split_no, (split, count) in enumerate(cfg.per_class.items()):
        for class_no, scene_class in enumerate(SCENE_NAMES):
            for k in range(count):
                rng = np.random.default_rng([seed, split_no, class_no, k])
                ms, mask = render_location(rng, scene_class, spectra, cfg)
                loc_id = f"synth-{split}-{scene_class}-{k:04d}"
                rows += _rows_for(out, loc_id, scene_class, split, _location_transform(index), crs, ms, mask)
                index += 1
                if index % 500 == 0 or index == total:
                    progress(f"synth: {index}/{total} locations written")
    manifest_path = out / MANIFEST_NAME
    write_manifest(make_manifest(rows), manifest_path)
    return manifest_path
