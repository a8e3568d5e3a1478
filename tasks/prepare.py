"""prepare stage: make or ingest the source data, merge ingested scenes, build the cache.

Outputs: <raw_dir>/ (tiles + manifest of the source) and <prepared_dir>/ (merged manifest with
paths relative to the project root, plus the memory-mapped cache). Both are written next to
the old ones and swapped in only when complete, so a failed run loses nothing stored.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import pandas as pd

from ms2rgb.tasks.config import DataConfig, Params
from ms2rgb.tasks.data.atomic import swap_in_dir
from ms2rgb.tasks.data.cache import build_cache
from ms2rgb.tasks.data.legend import SYNTH_LEGEND, read_legend, write_legend
from ms2rgb.tasks.data.manifest import (
    MANIFEST_NAME,
    SEGMENTATION_DIR,
    SEGMENTATION_SPLITS,
    SOURCE_FILE,
    read_manifest,
    write_manifest,
)
from ms2rgb.tasks.data.sources.mask_folder import build_folder_segmentation
from ms2rgb.tasks.data.sources.scene_segmentation import build_scene_segmentation
from ms2rgb.tasks.data.sources.scenes import INGEST_REPORT
from ms2rgb.tasks.data.sources.synth import generate
from ms2rgb.tasks.data.tile_stats import MEMO
from ms2rgb.tasks.tracking import StageTracker

SOURCE_IDENTITY = "source-identity.txt"  # in <raw_dir>: what made the synthetic tiles there
GENERATOR_CODE = Path(__file__).parent / "data"  # the synthetic tiles depend on this code and the synth params


def synth_identity(params: Params) -> str:
    """Names the synthetic data set: its params, the seed and the generator's code."""
    digest = hashlib.sha256(json.dumps([params.synth.model_dump(), params.seed], sort_keys=True).encode())
    for path in sorted(GENERATOR_CODE.rglob("*.py")):
        digest.update(path.relative_to(GENERATOR_CODE).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()


def kept_synth(final: Path, identity: str) -> bool:
    """Whether <raw_dir> holds a whole synthetic set of this identity (stamp matches, every file there)."""
    stamp, manifest = final / SOURCE_IDENTITY, final / MANIFEST_NAME
    if not (manifest.is_file() and stamp.is_file() and stamp.read_text() == identity):
        return False
    frame = read_manifest(manifest)
    return all((final / p).is_file() for column in ("path", "mask_path") for p in frame[column].dropna())


def make_source(root: Path, params: Params) -> Path:
    """Write the source's tiles into <raw_dir>.tmp, swap it in, return the manifest path.

    The synthetic set is kept when it was made from the same params, seed and code: a retrain after
    a new scene (which changes only the pool) then does not spend half a minute drawing it again."""
    data = params.data
    final = root / data.raw_dir
    if data.source == "synth":
        identity = synth_identity(params)
        if kept_synth(final, identity):
            print(f"prepare: {data.raw_dir} holds the synthetic set of these params and code: kept", flush=True)
            return final / MANIFEST_NAME
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if data.source == "synth":
        generate(tmp, params.synth, params.seed)
        (tmp / SOURCE_IDENTITY).write_text(identity)
    else:
        from ms2rgb.tasks.data.sources.eurosat import given_test_stems, ingest_eurosat

        ms_dir = data.eurosat_ms_dir
        assert ms_dir is not None, "DataConfig requires eurosat_ms_dir when source is eurosat"
        rgb = Path(data.eurosat_rgb_dir) if data.eurosat_rgb_dir else None
        test = given_test_stems(root / data.eurosat_test_list) if data.eurosat_test_list else frozenset()
        ingest_eurosat(Path(ms_dir), tmp, rgb, data.eurosat_split_fractions, params.seed, test)
    swap_in_dir(tmp, final)
    return final / MANIFEST_NAME


def make_segmentation(root: Path, params: Params) -> Path | None:
    """Write <segmentation_dir> (swapped in whole); the manifest of its tiles, or None for the synth source."""
    data, seg = params.data, params.data.segmentation
    final = root / SEGMENTATION_DIR
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if seg.source == "scenes":
        thresholds = params.weak_labels.thresholds()
        build_scene_segmentation(root / data.scenes_dir, tmp, thresholds, seg.block_tiles, seg.shares, params.seed)
    elif seg.source == "folder":
        build_folder_segmentation(root, seg.folder, tmp, seg.shares, params.seed)
    else:  # the generator's own masks: nothing here but the note of which source it is, and its legend
        (tmp / SOURCE_FILE).write_text(json.dumps({"source": seg.source}) + "\n")
        write_legend(tmp, SYNTH_LEGEND)
    swap_in_dir(tmp, final)
    return None if seg.source == "synth" else final / MANIFEST_NAME


def skipped_at_ingestion(scenes_dir: Path) -> dict[str, int]:
    """Scene tiles left out at ingestion, by reason (invalid pixels, cloud), summed over the scenes."""
    totals = {"invalid": 0, "cloudy": 0}
    for path in sorted(scenes_dir.glob(f"*/{INGEST_REPORT}")):
        summary = json.loads(path.read_text())
        totals = {k: v + int(summary.get(k, 0)) for k, v in totals.items()}
    return totals


def merged_manifest(root: Path, data: DataConfig, segmentation: Path | None = None) -> pd.DataFrame:
    """Source manifest plus every ingested scene, with paths relative to the project root. With a
    `segmentation` manifest, its tiles replace the source's captions/fewshot/seg_test tiles."""
    parts = []
    # A scene manifest's paths are relative to the scenes folder (they start with the scene id).
    for base, manifest_path in [(data.raw_dir, root / data.raw_dir / MANIFEST_NAME)] + [
        (data.scenes_dir, p) for p in sorted((root / data.scenes_dir).glob(f"*/{MANIFEST_NAME}"))
    ]:
        parts.append(_rooted(read_manifest(manifest_path), base))
    if segmentation is not None:
        parts[0] = parts[0][~parts[0]["split"].isin(SEGMENTATION_SPLITS)]
        parts.append(_rooted(read_manifest(segmentation), SEGMENTATION_DIR))
    return pd.concat(parts, ignore_index=True)


def _rooted(frame: pd.DataFrame, base: str) -> pd.DataFrame:
    for column in ("path", "mask_path", "index_path"):  # every file column of the manifest
        frame[column] = frame[column].map(lambda p: f"{base}/{p}" if isinstance(p, str) else p)
    return frame


def run(root: Path, params: Params, tracker: StageTracker) -> dict[str, Any]:
    """Stage entry point (DVC and Prefect call this alike)."""
    start = time.perf_counter()
    data = params.data
    tracker.log_params(
        {
            "data": data.model_dump(),
            "synth": params.synth.model_dump(),
            "weak_labels": params.weak_labels.model_dump(),
            "seed": params.seed,
        }
    )
    make_source(root, params)
    manifest = merged_manifest(root, data, make_segmentation(root, params))
    final = root / data.prepared_dir
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    indexed, unreadable = build_cache(manifest, root, tmp, previous=final if final.is_dir() else None, memo=root / MEMO)
    write_manifest(indexed, tmp / MANIFEST_NAME)
    write_legend(tmp, read_legend(root / SEGMENTATION_DIR))  # the detector's class set, beside its masks
    swap_in_dir(tmp, final)
    tracker.log_dataset(manifest, "manifest", final / MANIFEST_NAME, context="prepare")
    counts = manifest.groupby(["split", "modality"]).size()
    return {
        "tiles": int(len(manifest)),
        "scene_tiles": int(manifest["source"].str.startswith("scene:").sum()),
        "scene_tiles_skipped": skipped_at_ingestion(root / data.scenes_dir),
        "segmentation_source": params.data.segmentation.source,
        "unreadable": unreadable[:50],
        "unreadable_count": len(unreadable),
        "counts": {f"{s}/{m}": int(n) for (s, m), n in counts.items()},
        "seconds": round(time.perf_counter() - start, 2),
    }
