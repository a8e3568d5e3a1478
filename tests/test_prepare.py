"""prepare stage: the synthetic set is drawn again only when its params, seed or generator code change."""

from __future__ import annotations

from pathlib import Path

import pytest

from ms2rgb.flows.stages import run_stage

KEPT = "holds the synthetic set of these params and code: kept"


def test_prepare_keeps_the_synthetic_set_until_params_or_files_change(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_stage("prepare", project)
    tile = next((project / "data" / "raw").rglob("*.tif"))
    drawn = tile.stat().st_mtime_ns
    capsys.readouterr()
    again = run_stage("prepare", project)
    assert KEPT in capsys.readouterr().out and tile.stat().st_mtime_ns == drawn
    assert again["tiles"] > 0
    tile.unlink()  # a set with a file gone is not whole: drawn again
    run_stage("prepare", project)
    assert KEPT not in capsys.readouterr().out and tile.is_file()
    params = project / "params.yaml"
    params.write_text(params.read_text().replace("seed: 0", "seed: 1", 1))
    before = tile.read_bytes()
    run_stage("prepare", project)
    assert KEPT not in capsys.readouterr().out and tile.read_bytes() != before  # another seed, other tiles
