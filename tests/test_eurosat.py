"""EuroSAT conversion on a tiny fake EuroSAT_MS/RGB tree written with rasterio (real JPEGs, real CRS)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
from helpers_params import config
from rasterio.transform import Affine

from ms2rgb.models.bands import RGB_BANDS, S2_BANDS
from ms2rgb.tasks.data.geotiff import sha256_of
from ms2rgb.tasks.data.manifest import COLUMNS, EUROSAT_SPLITS, MANIFEST_NAME, SPLIT_MODALITIES, read_manifest
from ms2rgb.tasks.data.render import render_rgb
from ms2rgb.tasks.data.sources.eurosat import EUROSAT_FILE_BAND_ORDER, given_test_stems, ingest_eurosat, split_sizes
from ms2rgb.tasks.errors import DatasetLayoutError, Ms2rgbError, UnknownClassError

# EuroSAT jpgs have no georeference by design; rasterio warns each time the test writes or reads one.
pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")

CLASSES = ("Forest", "River", "SeaLake")
PER_CLASS = 12
# Exact on 12 locations per class: 3, 2, 1, 3, 1, 2.
FRACTIONS = {
    "ms_train": 3 / 12,
    "pair_train": 2 / 12,
    "pair_test": 1 / 12,
    "rgb_train": 3 / 12,
    "ms_pool": 1 / 12,
    "test": 2 / 12,
}


def band_value(band: str, n: int) -> int:
    """Recognisable value: 1000 * (S2_BANDS index + 1) + tile number."""
    return 1000 * (S2_BANDS.index(band) + 1) + n


def tile_transform(cls: str, n: int) -> Affine:
    """A distinct 10 m, 64 px footprint per location in UTM 33N."""
    return Affine(10.0, 0.0, 400000.0 + 640.0 * n, 0.0, -10.0, 5000000.0 - 640.0 * CLASSES.index(cls))


def rgb_colour(cls: str, n: int) -> tuple[int, int, int]:
    return 10 * n, 60 * CLASSES.index(cls), 200


def write_fake_eurosat(root: Path) -> tuple[Path, Path]:
    """EuroSAT-like tree: <root>/ms/<Class>/<Class>_<n>.tif (EuroSAT band order) and rgb/<...>.jpg."""
    for cls in CLASSES:
        (root / "ms" / cls).mkdir(parents=True)
        (root / "rgb" / cls).mkdir(parents=True)
        for n in range(1, PER_CLASS + 1):
            ms = np.stack([np.full((64, 64), band_value(b, n), np.uint16) for b in EUROSAT_FILE_BAND_ORDER])
            with rasterio.open(
                root / "ms" / cls / f"{cls}_{n}.tif",
                "w",
                driver="GTiff",
                width=64,
                height=64,
                count=13,
                dtype="uint16",
                crs="EPSG:32633",
                transform=tile_transform(cls, n),
            ) as dst:
                dst.write(ms)
            rgb = np.stack([np.full((64, 64), v, np.uint8) for v in rgb_colour(cls, n)])
            rgb[:, :8, :8] = 255  # some structure, so the copy check is not just about a flat colour
            # Real JPEG (JFIF) without georeference, as in EuroSAT's RGB zip.
            with rasterio.open(
                root / "rgb" / cls / f"{cls}_{n}.jpg", "w", driver="JPEG", width=64, height=64, count=3, dtype="uint8"
            ) as dst:
                dst.write(rgb)
    return root / "ms", root / "rgb"


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_fake_eurosat(tmp_path_factory.mktemp("eurosat"))


@pytest.fixture(scope="module")
def converted(fake: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, Path]:
    out = tmp_path_factory.mktemp("out")
    frame = ingest_eurosat(fake[0], out, rgb_dir=fake[1], split_fractions=FRACTIONS, seed=3, progress=None)
    return frame, out


def test_fake_jpgs_are_real_jpeg(fake: tuple[Path, Path]) -> None:
    assert (fake[1] / "Forest" / "Forest_1.jpg").read_bytes()[:3] == b"\xff\xd8\xff"


def test_bands_reordered_into_s2_order(converted: tuple[pd.DataFrame, Path]) -> None:
    frame, out = converted
    ms_rows = frame[frame["modality"] == "ms"]
    for row in ms_rows.to_dict("records"):
        n = int(row["location_id"].rsplit("_", 1)[1])
        with rasterio.open(out / row["path"]) as tile:
            arr = tile.read()
            assert arr.shape == (13, 64, 64) and arr.dtype == np.uint16
            assert tile.descriptions == S2_BANDS and tile.crs.to_string() == "EPSG:32633"
            assert tile.transform == tile_transform(row["class"], n)
        assert [int(arr[i, 0, 0]) for i in range(13)] == [band_value(b, n) for b in S2_BANDS]
        assert int(arr[8, 0, 0]) == band_value("B8A", n)  # B8A: last in the file, index 8 here


def test_manifest_schema_and_files(converted: tuple[pd.DataFrame, Path]) -> None:
    frame, out = converted
    pd.testing.assert_frame_equal(read_manifest(out / MANIFEST_NAME), frame)
    assert list(frame.columns) == list(COLUMNS)
    assert frame["id"].is_unique and frame["mask_path"].isna().all() and set(frame["source"]) == {"eurosat"}
    assert set(frame["class"]) == set(CLASSES)
    assert all(sha256_of(out / p) == h for p, h in zip(frame["path"], frame["sha256"]))
    forest = frame[(frame["location_id"] == "Forest_4")]
    assert set(forest["path"]) <= {"tiles/ms/Forest/Forest_4.tif", "tiles/rgb/Forest/Forest_4.tif"}


def test_splits_location_disjoint_with_right_modalities(converted: tuple[pd.DataFrame, Path]) -> None:
    frame, _ = converted
    per_location = frame.groupby("location_id")["split"].nunique()
    assert (per_location == 1).all() and len(per_location) == len(CLASSES) * PER_CLASS
    for split in EUROSAT_SPLITS:
        modalities = SPLIT_MODALITIES[split]
        rows = frame[frame["split"] == split]
        for cls in CLASSES:
            expected = round(FRACTIONS[split] * PER_CLASS)
            assert rows[rows["class"] == cls]["location_id"].nunique() == expected
        assert set(rows["modality"]) == set(modalities)
        assert (rows.groupby("location_id").size() == len(modalities)).all()


def test_a_small_class_still_fills_every_split_with_a_share() -> None:
    # 20 locations with the default shares: 2 % of 20 rounds to nothing, yet pair_test gets one.
    fractions = config("data").eurosat_split_fractions
    sizes = dict(zip(fractions, split_sizes(list(fractions.values()), 20)))
    assert sum(sizes.values()) == 20 and min(sizes.values()) == 1
    assert sizes == {"ms_train": 5, "ms_pool": 5, "rgb_train": 5, "pair_train": 1, "pair_test": 1, "test": 3}
    assert split_sizes([0.5, 0.0, 0.5], 4) == [2, 0, 2]  # no share, no location
    assert split_sizes([0.9, 0.05, 0.05], 2) == [2, 0, 0]  # too few locations to give each one


def test_splits_deterministic_per_seed(
    fake: tuple[Path, Path], converted: tuple[pd.DataFrame, Path], tmp_path: Path
) -> None:
    def splits(frame: pd.DataFrame) -> dict[str, str]:
        return dict(zip(frame["location_id"], frame["split"]))

    again = ingest_eurosat(fake[0], tmp_path / "a", rgb_dir=fake[1], split_fractions=FRACTIONS, seed=3, progress=None)
    pd.testing.assert_frame_equal(again, converted[0])
    other = ingest_eurosat(fake[0], tmp_path / "b", rgb_dir=None, split_fractions=FRACTIONS, seed=4, progress=None)
    assert splits(other) != splits(converted[0])


def test_a_given_test_list_forms_the_test_split_and_the_rest_follow_the_fractions(
    fake: tuple[Path, Path], tmp_path: Path
) -> None:
    listing = tmp_path / "eurosat-test.txt"
    listing.write_text("# published split\nForest_1.jpg\nRiver_2.tif\nSeaLake_3\n")  # any extension
    given = given_test_stems(listing)
    assert given == {"Forest_1", "River_2", "SeaLake_3"}
    frame = ingest_eurosat(fake[0], tmp_path / "out", None, FRACTIONS, test_stems=given, progress=None)
    locations = frame.drop_duplicates("location_id").set_index("location_id")["split"]
    assert set(locations[locations == "test"].index) == given
    # The other 11 locations of each class share the other splits in proportion (3:2:1:3:1 of 10).
    per_class = locations[locations != "test"].groupby(lambda stem: stem.rsplit("_", 1)[0]).size()
    assert per_class.to_dict() == dict.fromkeys(CLASSES, 11)
    folder = tmp_path / "test-tiles" / "River"
    folder.mkdir(parents=True)
    (folder / "River_5.tif").write_bytes(b"")
    assert given_test_stems(tmp_path / "test-tiles") == {"River_5"}
    with pytest.raises(DatasetLayoutError, match="eurosat_test_list not found"):
        given_test_stems(tmp_path / "missing.txt")


def test_rgb_copied_from_jpg_with_ms_georeference(
    fake: tuple[Path, Path], converted: tuple[pd.DataFrame, Path]
) -> None:
    frame, out = converted
    rgb_rows = frame[frame["modality"] == "rgb"]
    assert len(rgb_rows) > 0
    for row in rgb_rows.to_dict("records"):
        cls, n = row["class"], int(row["location_id"].rsplit("_", 1)[1])
        with rasterio.open(fake[1] / cls / f"{row['location_id']}.jpg") as jpg:
            expected = jpg.read()
        with rasterio.open(out / row["path"]) as tile:
            assert np.array_equal(tile.read(), expected)
            assert tile.descriptions == RGB_BANDS and tile.crs.to_string() == "EPSG:32633"
            assert tile.transform == tile_transform(cls, n)


def test_rgb_rendered_without_jpgs(fake: tuple[Path, Path], tmp_path: Path) -> None:
    frame = ingest_eurosat(fake[0], tmp_path, rgb_dir=None, split_fractions={"test": 1.0}, progress=None)
    row = frame[(frame["modality"] == "rgb") & (frame["location_id"] == "River_7")].iloc[0]
    with rasterio.open(tmp_path / row["path"]) as tile, rasterio.open(tmp_path / "tiles/ms/River/River_7.tif") as ms:
        assert np.array_equal(tile.read(), render_rgb(ms.read()))


def test_progress_reported(fake: tuple[Path, Path], tmp_path: Path) -> None:
    lines: list[str] = []
    ingest_eurosat(fake[0], tmp_path, rgb_dir=None, split_fractions={"ms_pool": 1.0}, progress=lines.append)
    assert lines[-1] == "eurosat: 36/36 locations converted (36 tiles)"


def test_unknown_class_folder(fake: tuple[Path, Path], tmp_path: Path) -> None:
    ms = tmp_path / "ms"
    (ms / "Forest").mkdir(parents=True)
    (ms / "Clouds").mkdir()
    with pytest.raises(UnknownClassError, match=r"'Clouds'.*AnnualCrop"):
        ingest_eurosat(ms, tmp_path / "out", rgb_dir=None, split_fractions=FRACTIONS, progress=None)


@pytest.mark.parametrize("make", [False, True])  # missing folder / folder without class folders
def test_missing_or_empty_ms_dir(tmp_path: Path, make: bool) -> None:
    ms = tmp_path / "EuroSAT_MS"
    if make:
        ms.mkdir()
    with pytest.raises(DatasetLayoutError, match=r"expected <ms_dir>/<ClassName>/<ClassName>_<n>\.tif"):
        ingest_eurosat(ms, tmp_path / "out", rgb_dir=None, split_fractions=FRACTIONS, progress=None)


def test_bad_split_fractions(fake: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(Ms2rgbError, match="unknown split"):
        ingest_eurosat(fake[0], tmp_path, rgb_dir=None, split_fractions={"fewshot": 1.0}, progress=None)
    with pytest.raises(Ms2rgbError, match="sum to 1"):
        ingest_eurosat(fake[0], tmp_path, rgb_dir=None, split_fractions={"test": 0.5}, progress=None)


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_of(p) for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_truncated_tif_leaves_a_stored_output_whole_and_a_new_one_absent(tmp_path: Path) -> None:
    ms, rgb = write_fake_eurosat(tmp_path / "eurosat")
    out = tmp_path / "out"
    ingest_eurosat(ms, out, rgb_dir=rgb, split_fractions=FRACTIONS, seed=3, progress=None)
    stored = _tree_digest(out)
    bad = ms / "River" / "River_2.tif"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    with pytest.raises(Ms2rgbError, match="River_2.tif"):
        ingest_eurosat(ms, out, rgb_dir=rgb, split_fractions=FRACTIONS, seed=3, progress=None)
    assert _tree_digest(out) == stored  # no stored tile overwritten, manifest still matches
    with pytest.raises(Ms2rgbError, match="River_2.tif"):
        ingest_eurosat(ms, tmp_path / "new", rgb_dir=rgb, split_fractions=FRACTIONS, seed=3, progress=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eurosat", "out"]  # no half-written output
