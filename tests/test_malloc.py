"""glibc's malloc thresholds (tasks/training/malloc.py) reach every process the command starts."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ms2rgb.tasks.training.malloc import MMAP_THRESHOLD, TRIM_THRESHOLD, steady_malloc

VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's thresholds exist on Linux only")
def test_thresholds_reach_processes_started_afterwards_even_over_a_dask_nannys_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(VARIABLES[0], raising=False)
    monkeypatch.setenv(VARIABLES[1], "65536")  # what Dask's nanny gives its workers: adaptive mode off
    steady_malloc()
    code = "import os; print(*(os.environ.get(v) for v in ('MALLOC_MMAP_THRESHOLD_', 'MALLOC_TRIM_THRESHOLD_')))"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert child.stdout.split() == [str(MMAP_THRESHOLD), str(TRIM_THRESHOLD)]
