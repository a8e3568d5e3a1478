"""The validate stage on real (tiny) GeoTIFFs: a valid set passes, each kind of damage is named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers_data import first_id, make_dataset, replace_tile, tile_path, update_rows
from helpers_params import config

from ms2rgb.tasks.data.cache import build_cache
from ms2rgb.tasks.data.manifest import MANIFEST_NAME, read_manifest, write_manifest
from ms2rgb.tasks.data.tile_stats import compute_tile_stats
from ms2rgb.tasks.errors import Ms2rgbError, ParamsError, ValidationFailed
from ms2rgb.tasks.validate import ValidationOutcome, raise_if_failed, validate_dataset


@pytest.fixture(scope="module")
def valid_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One valid data set per module; tests damage private copies of it."""
    root = tmp_path_factory.mktemp("valid") / "data"
    make_dataset(root)
    return root


@pytest.fixture
def manifest(valid_source: Path, tmp_path: Path) -> Path:
    """Manifest path of a fresh copy of the valid data set (data root = its folder)."""
    root = tmp_path / "data"
    shutil.copytree(valid_source, root)
    return root / MANIFEST_NAME


def run(manifest_path: Path, **overrides: object) -> ValidationOutcome:
    return validate_dataset(
        manifest_path,
        manifest_path.parent,
        manifest_path.parent.parent / "report",
        config("validate", **overrides),
        progress=lambda _: None,
    )


def failed_columns(outcome: ValidationOutcome) -> set[str]:
    return {f["column"] for f in outcome.failed}


def assert_named(outcome: ValidationOutcome, column: str, ident: str) -> dict:
    """The failure on `column` lists `ident` among its offenders; return that failure."""
    assert not outcome.passed
    matches = [f for f in outcome.failed if f["column"] == column and ident in f["offending"]]
    assert matches, f"{ident} not named under {column}: {outcome.failed}"
    summary = json.loads(outcome.summary_json.read_text())
    assert summary["passed"] is False and ident in json.dumps(summary["failed"])
    return matches[0]


def test_valid_dataset_passes(manifest: Path) -> None:
    outcome = run(manifest)
    assert outcome.passed, outcome.failed
    assert outcome.expectations > 10 and outcome.failed == []
    assert outcome.docs_index.name == "index.html" and outcome.docs_index.is_file()
    assert outcome.docs_index.is_relative_to(manifest.parent.parent / "report" / "data_docs")
    result = json.loads(outcome.result_json.read_text())
    assert result["success"] is True
    summary = json.loads(outcome.summary_json.read_text())
    assert summary["passed"] is True and summary["expectations"] == outcome.expectations
    raise_if_failed(outcome)  # a passed outcome raises nothing


def test_tile_stats_record_bad_files_without_raising(manifest: Path) -> None:
    ms_id, rgb_id = first_id(manifest, "ms"), first_id(manifest, "rgb")
    tile_path(manifest, rgb_id).unlink()
    path = tile_path(manifest, ms_id)
    path.write_bytes(path.read_bytes()[:600])
    lines: list[str] = []
    stats = compute_tile_stats(read_manifest(manifest), manifest.parent, progress=lines.append).set_index("id")
    assert len(stats) == len(read_manifest(manifest)) and lines
    assert not stats.loc[ms_id, "readable"] and stats.loc[ms_id, "file_exists"]
    assert not stats.loc[rgb_id, "file_exists"] and not stats.loc[rgb_id, "sha_matches"]
    good = stats.drop(index=[ms_id, rgb_id])
    assert good["readable"].all() and good["sha_matches"].all() and good["mask_ok"].all()
    assert (good["nan_share"] == 0).all() and (good["max_value"] > 0).all()


def test_the_memo_decodes_only_tiles_it_has_not_seen_and_never_serves_changed_bytes(
    manifest: Path, tmp_path: Path
) -> None:
    memo, frame = tmp_path / "memo" / "facts.parquet", read_manifest(manifest)
    lines: list[str] = []
    first = compute_tile_stats(frame, manifest.parent, progress=lambda _: None, memo=memo)
    again = compute_tile_stats(frame, manifest.parent, progress=lines.append, memo=memo)
    pd.testing.assert_frame_equal(first, again)
    assert lines[-1].endswith(f"({len(frame)} known by content)")
    # A tile truncated on disk (manifest unchanged) is decoded again, not taken from the memo.
    tile_id = first_id(manifest, "ms")
    path = tile_path(manifest, tile_id)
    path.write_bytes(path.read_bytes()[:600])
    changed = compute_tile_stats(frame, manifest.parent, progress=lines.append, memo=memo).set_index("id")
    assert not changed.loc[tile_id, "readable"] and not changed.loc[tile_id, "sha_matches"]
    assert lines[-1].endswith(f"({len(frame) - 1} known by content)")
    memo.write_bytes(b"not parquet")  # a broken memo costs time, never a wrong answer
    pd.testing.assert_frame_equal(
        compute_tile_stats(frame, manifest.parent, progress=lambda _: None, memo=memo).set_index("id"), changed
    )


def test_tiles_the_cache_build_decoded_are_not_decoded_again_by_validation(manifest: Path, tmp_path: Path) -> None:
    memo, frame = tmp_path / "facts.parquet", read_manifest(manifest)
    build_cache(frame, manifest.parent, tmp_path / "prepared", progress=lambda _: None, memo=memo)
    lines: list[str] = []
    stats = compute_tile_stats(frame, manifest.parent, progress=lines.append, memo=memo)
    assert lines[-1].endswith(f"({len(frame)} known by content)")
    pd.testing.assert_frame_equal(stats, compute_tile_stats(frame, manifest.parent, progress=lambda _: None))


def test_truncated_tile_fails(manifest: Path) -> None:
    tile_id = first_id(manifest, "ms", "test")
    path = tile_path(manifest, tile_id)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    failure = assert_named(run(manifest), "readable", tile_id)
    assert failure["files"] == [path.relative_to(manifest.parent).as_posix()]


def test_wrong_band_count_fails_only_the_band_check(manifest: Path) -> None:
    tile_id = first_id(manifest, "ms")
    replace_tile(manifest, tile_id, np.full((12, 64, 64), 1000, dtype=np.uint16))
    outcome = run(manifest)
    assert_named(outcome, "band_count/expected_bands", tile_id)
    assert failed_columns(outcome) == {"band_count/expected_bands"}


def test_nan_tile_fails(manifest: Path) -> None:
    tile_id = first_id(manifest, "ms")
    array = np.full((13, 64, 64), 1500.0, dtype=np.float32)
    array[0, :8, :8] = np.nan  # 64 of 4096 pixels: below the nodata bound, so NaN is what fails
    replace_tile(manifest, tile_id, array)
    outcome = run(manifest)
    assert_named(outcome, "nan_share", tile_id)
    assert_named(outcome, "dtype/expected_dtype", tile_id)


def test_bright_genuine_l1c_passes_and_a_saturated_tile_fails(manifest: Path) -> None:
    bright, saturated = first_id(manifest, "ms"), first_id(manifest, "ms", "test")
    array = np.full((13, 64, 64), 1500, dtype=np.uint16)
    array[:, :4, :4] = 21_668  # what a real EuroSAT Industrial roof reaches: above 2.0 reflectance, still L1C
    replace_tile(manifest, bright, array)
    assert run(manifest).passed
    array[3, :16] = 65_535  # a quarter of the tile saturated in the red band
    replace_tile(manifest, saturated, array)
    outcome = run(manifest)
    assert_named(outcome, "saturated_share", saturated)
    assert failed_columns(outcome) == {"saturated_share"}


def test_a_warn_severity_reports_without_stopping_and_fail_stops(manifest: Path) -> None:
    frame = read_manifest(manifest)
    rows = frame.index[(frame["split"] == "ms_train") & (frame["class"] != frame["class"].iloc[0])]
    frame.loc[rows, "class"] = frame.loc[rows[0], "class"]  # two classes left: one holds most of the split
    write_manifest(frame, manifest)
    warned = run(manifest)  # params: class_balance.share is `warn`
    assert warned.passed and {f["severity"] for f in warned.failed} == {"warn"}
    assert {f["column"] for f in warned.failed} == {"share"}
    summary = json.loads(warned.summary_json.read_text())
    assert summary["passed"] is True and summary["warnings"] == len(warned.failed)
    raise_if_failed(warned)  # warnings never raise
    stopped = run(manifest, severity={})
    assert not stopped.passed and {f["severity"] for f in stopped.failed} == {"fail"}
    with pytest.raises(ValidationFailed, match="share"):
        raise_if_failed(stopped)


def test_a_severity_key_that_names_no_expectation_is_refused_with_the_known_keys(manifest: Path) -> None:
    with pytest.raises(ParamsError) as caught:
        run(manifest, severity={"tiles.max_vaule": "warn"})
    message = str(caught.value)
    assert "validate.severity.tiles.max_vaule" in message and "tiles.max_value" in message and "\n" not in message


def test_missing_file_fails(manifest: Path) -> None:
    tile_id = first_id(manifest, "rgb")
    path = tile_path(manifest, tile_id)
    path.unlink()
    failure = assert_named(run(manifest), "file_exists", tile_id)
    assert failure["files"] == [path.relative_to(manifest.parent).as_posix()]


def test_unknown_class_fails(manifest: Path) -> None:
    tile_id = first_id(manifest, "ms", "ms_train")
    update_rows(manifest, tile_id, **{"class": "Volcano"})
    assert_named(run(manifest), "class", tile_id)


def test_location_leakage_fails(manifest: Path) -> None:
    frame = read_manifest(manifest)
    test_location = str(frame.loc[frame["split"] == "test", "location_id"].iloc[0])
    update_rows(manifest, first_id(manifest, "ms", "ms_train"), location_id=test_location)
    outcome = run(manifest)
    assert_named(outcome, "n_splits", test_location)
    assert failed_columns(outcome) == {"n_splits"}


def test_raise_if_failed_names_offending_tile(manifest: Path) -> None:
    tile_id = first_id(manifest, "ms", "test")
    path = tile_path(manifest, tile_id)
    path.unlink()
    outcome = run(manifest)
    with pytest.raises(ValidationFailed) as caught:
        raise_if_failed(outcome)
    message = str(caught.value)
    assert tile_id in message and path.name in message and str(outcome.summary_json) in message


def test_refuses_output_links_outside_out_dir(manifest: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "report"
    out_dir.mkdir()
    (out_dir / "data_docs").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(Ms2rgbError, match="outside"):
        validate_dataset(manifest, manifest.parent, out_dir, config("validate"), progress=lambda _: None)
