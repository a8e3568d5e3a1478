"""The `ms2rgb` command line on a real project: scene ingestion end to end, and user errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from test_ingest import S2_DIR

from ms2rgb.flows.cli import main
from ms2rgb.flows.stages import run_stage


@pytest.mark.slow
def test_ingested_real_scene_joins_the_pool_and_validates(project: Path) -> None:
    bands = sorted(str(p) for p in S2_DIR.glob("s2_B*.jp2"))
    assert main(["--root", str(project), "data", "ingest", *bands, "--scene-id", "s2crop"]) == 0
    run_stage("prepare", project)
    report = run_stage("validate", project)
    assert report["passed"] is True
    manifest = pd.read_parquet(project / "data" / "prepared" / "manifest.parquet")
    scene = manifest[manifest["source"] == "scene:s2crop"]
    assert len(scene) == 900 and (scene["split"] == "ms_pool").all() and scene["class"].isna().all()
    assert set(scene["crs"]) == {"EPSG:32618"}  # the scene keeps its own UTM zone


def test_missing_scene_file_is_a_clear_error(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--root", str(project), "data", "ingest", str(project / "nope_B02.jp2")])
    err = capsys.readouterr().err
    assert code == 2 and "nope_B02.jp2" in err


def test_synth_command_writes_a_manifest(project: Path, tmp_path: Path) -> None:
    assert main(["--root", str(project), "data", "synth", "--out", str(tmp_path / "s")]) == 0
    frame = pd.read_parquet(tmp_path / "s" / "manifest.parquet")
    assert set(frame["source"]) == {"synth"} and frame["sha256"].str.len().eq(64).all()


def test_bad_params_value_stops_with_the_key(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    params = project / "params.yaml"
    params.write_text(params.read_text().replace("source: synth ", "source: landsat ", 1))
    assert main(["--root", str(project), "stage", "prepare"]) == 2
    assert "data.source" in capsys.readouterr().err
    assert not (project / "data" / "raw").exists()  # nothing was written by the failed run


def test_eurosat_source_runs_through_prepare_and_validate(project: Path, tmp_path: Path) -> None:
    from test_eurosat import write_fake_eurosat

    ms_dir, rgb_dir = write_fake_eurosat(tmp_path / "eurosat")
    assert (
        main(["--root", str(project), "data", "eurosat", "--ms", str(ms_dir), "--out", str(tmp_path / "converted")])
        == 0
    )
    assert (tmp_path / "converted" / "manifest.parquet").exists()
    params = project / "params.yaml"
    params.write_text(
        params.read_text()
        .replace("source: synth ", "source: eurosat ", 1)
        .replace("eurosat_ms_dir: null", f"eurosat_ms_dir: {ms_dir}", 1)
        .replace("eurosat_rgb_dir: null", f"eurosat_rgb_dir: {rgb_dir}", 1)
    )
    prepared = run_stage("prepare", project)
    assert prepared["tiles"] > 0
    assert run_stage("validate", project)["passed"] is True
    manifest = pd.read_parquet(project / "data" / "prepared" / "manifest.parquet")
    assert set(manifest["source"]) == {"eurosat"}


def _imported(code: str) -> set[str]:
    """The top-level packages a fresh interpreter holds after running `code`."""
    report = "import sys; print(' '.join({m.split('.')[0] for m in sys.modules}))"
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\n{report}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return set(out.split())


HEAVY = {"mlflow", "prefect", "dvc", "pandas", "pyogrio", "matplotlib"}  # none needed to read a model file


def test_reading_commands_import_only_what_they_need() -> None:
    # `--help` of any command: argparse only, not even torch (0.1 s instead of seconds).
    assert not _imported("from ms2rgb.flows.cli import build_parser; build_parser()") & (HEAVY | {"torch"})
    # detect / predict with `--model artifacts`: MLflow (and its pandas) only for a registered model,
    # pyogrio only for --gpkg, matplotlib only once the overlay is drawn.
    code = "import ms2rgb.tasks.detection.detect, ms2rgb.tasks.prediction.scene_map"
    assert not _imported(code) & HEAVY
