"""Parallel work (params.yaml `compute`, tasks/training/parallel.py): the compare grid's cells as Prefect
tasks on Prefect's process pool and on a real 2-worker local Dask cluster give exactly the serial run's
numbers (the report, and every weight of the students), in two worker processes, with torch pinned to
`compute.cell_threads`."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers_method_a import staged_project, student_weights
from prefect.settings import PREFECT_API_URL, temporary_settings

from ms2rgb.flows.stages import run_stage
from ms2rgb.tasks.config import ComputeConfig, load_params
from ms2rgb.tasks.data.cache import open_split
from ms2rgb.tasks.data.pairing import PAIRS_FILE
from ms2rgb.tasks.pairs import pool_chunks, pool_pseudo_labels
from ms2rgb.tasks.training.parallel import ProcessLocal, oversubscription, run_all


def set_compute(root: Path, **compute: object) -> None:
    """Edit keys of the project's `compute` section in place."""
    text = (root / "params.yaml").read_text()
    for key, value in compute.items():
        text, found = re.subn(rf"^(  {key}:) \S+", rf"\1 {value}", text, count=1, flags=re.M)
        assert found == 1, f"params.yaml has no compute.{key}"
    (root / "params.yaml").write_text(text)


def per_seed(report: dict) -> dict[str, dict[str, list[float]]]:
    return {k: {name: cell["per_seed"] for name, cell in cells.items()} for k, cells in report["by_k"].items()}


def threads_seen(tag: int) -> tuple[int, int]:
    return tag, torch.get_num_threads()


def test_serial_and_process_pool_return_every_call_in_order_with_pinned_threads(prefect_api: str) -> None:

    calls = [{"tag": tag} for tag in range(4)]
    names = [f"call{tag}" for tag in range(4)]
    torch.set_num_threads(2)
    serial = ComputeConfig(
        workers=1, cell_threads=1, task_runner="processes", device="auto", dask_address=None, nproc=1
    )
    assert run_all(threads_seen, calls, names, serial) == [(tag, 1) for tag in range(4)]
    assert torch.get_num_threads() == 2  # the stage's own work after the cells keeps its threads
    pool = ComputeConfig(workers=2, cell_threads=1, task_runner="processes", device="auto", dask_address=None, nproc=1)
    with temporary_settings({PREFECT_API_URL: prefect_api}):
        assert run_all(threads_seen, calls, names, pool) == [(tag, 1) for tag in range(4)]


def test_process_local_builds_once_per_key_and_keeps_nothing_from_a_failed_build() -> None:
    built: list[str] = []

    def build(value: str) -> str:
        built.append(value)
        return value

    cache: ProcessLocal[str] = ProcessLocal()
    assert [cache.get("a", lambda: build("A")) for _ in range(3)] == ["A"] * 3 and built == ["A"]
    assert cache.get("b", lambda: build("B")) == "B" and built == ["A", "B"]  # another run: built again

    def broken() -> str:
        raise OSError("tiles unreadable")

    with pytest.raises(OSError):
        cache.get("c", broken)
    assert cache.key is None and cache.value is None  # not "b"'s value under any key
    cache.put("d", "D")
    assert cache.get("d", lambda: build("never")) == "D" and "never" not in built
    cache.clear()
    assert cache.get("d", lambda: build("D2")) == "D2"


def test_oversubscription_is_named_with_the_threads_to_set() -> None:
    cores = os.cpu_count() or 1
    wide = ComputeConfig(
        workers=cores + 1, cell_threads=2, task_runner="dask", device="auto", dask_address=None, nproc=1
    )
    message = oversubscription(wide)
    assert message is not None and f"{cores} cores" in message and "set compute.cell_threads: 1" in message
    alone = ComputeConfig(workers=1, cell_threads=cores, task_runner="dask", device="auto", dask_address=None, nproc=1)
    assert oversubscription(alone) is None
    remote = ComputeConfig(
        workers=64, cell_threads=2, task_runner="dask", device="auto", dask_address="tcp://127.0.0.1:8786", nproc=1
    )
    assert oversubscription(remote) is None  # a remote cluster's cores are not this machine's


@pytest.mark.slow
def test_compare_grid_on_two_processes_and_on_two_dask_workers_matches_the_serial_run(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, prefect_api: str, monkeypatch: pytest.MonkeyPatch
) -> None:

    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))  # worker processes import student_weights
    root = staged_project(tmp_path_factory, "student", tmp_path / "project")
    set_compute(root, workers=1, cell_threads=1)  # each cell on one thread, in every run below
    serial = per_seed(run_stage("compare", root))
    cells = [{"name": name, "seed": seed} for name in ("rgb_only", "full_method") for seed in (0, 1)]
    calls = {runner: [c | {"root": root, "scratch": tmp_path / runner} for c in cells] for runner in RUNNERS}
    labels = [str(c) for c in cells]  # braces: Prefect formats run names, so run_all must escape them
    one = ComputeConfig(workers=1, cell_threads=1, task_runner="processes", device="auto", dask_address=None, nproc=1)
    weights = run_all(student_weights, calls["serial"], labels, one)
    with temporary_settings({PREFECT_API_URL: prefect_api}):
        for runner in RUNNERS[1:]:
            set_compute(root, workers=2, cell_threads=1, task_runner=runner)
            assert per_seed(run_stage("compare", root)) == serial, runner
            two = ComputeConfig(
                workers=2, cell_threads=1, task_runner=runner, device="auto", dask_address=None, nproc=1
            )
            again = run_all(student_weights, calls[runner], labels, two)
            assert all(torch.equal(a[1], b[1]) for a, b in zip(weights, again, strict=True)), runner
            workers = {pid for pid, _ in again}
            assert len(workers) == 2 and os.getpid() not in workers, runner  # two worker processes shared the cells


RUNNERS = ("serial", "processes", "dask")


def scores(report: dict) -> dict[str, tuple]:
    """Every variant's numbers in reports/detector.json, without its timings."""
    variants = report["by_shots"] | report["baseline_details"]
    return {name: (v["miou"], v["miou_ci95"], v["per_class_iou"], v["pixel_accuracy"]) for name, v in variants.items()}


def prompts(root: Path) -> dict[str, torch.Tensor]:
    """The saved head's learned tensors: its prompts and its pixel evidence."""
    saved = torch.load(root / "artifacts" / "detector" / "detector.pt", weights_only=True)
    evidence = saved["pixel_evidence"] or {"state": {}}
    return {f"prompt.{k}": v for k, v in saved["prompt_state"].items()} | {
        f"evidence.{k}": v for k, v in evidence["state"].items()
    }


@pytest.mark.slow
def test_detector_variants_on_two_dask_workers_match_the_serial_run(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, prefect_api: str
) -> None:
    from prefect.client.orchestration import get_client

    root = staged_project(tmp_path_factory, "validate", tmp_path / "project")
    set_compute(root, workers=1, cell_threads=1)
    serial, serial_prompts = run_stage("detector", root), prompts(root)
    set_compute(root, workers=2, cell_threads=1, task_runner="dask")
    with temporary_settings({PREFECT_API_URL: prefect_api}):
        parallel = run_stage("detector", root)
        with get_client(sync_client=True) as client:
            ran = {run.name for run in client.read_task_runs() if run.name.endswith("/seed0")}
    assert scores(parallel) == scores(serial) and len(scores(serial)) >= 5
    again = prompts(root)
    assert again.keys() == serial_prompts.keys() and all(torch.equal(again[k], serial_prompts[k]) for k in again)
    assert {f"full_k{max(parallel['by_shots'], key=int)}/seed0", "pixel_forest/seed0", "unet/seed0"} <= ran


@pytest.mark.slow
def test_pool_pseudo_labels_in_slices_on_two_processes_match_one_pass(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, prefect_api: str
) -> None:
    """The pairs stage's pseudo-labelling of the MS pool, cut into slices of whole inference batches
    and spread over two worker processes, gives every tile the distribution one pass gives it, and the
    stage the same pairs."""
    root = staged_project(tmp_path_factory, "matcher", tmp_path / "project")
    one_pass = run_stage("pairs", root)
    pairs = pd.read_parquet(root / "artifacts" / "pairs" / PAIRS_FILE)
    params = load_params(root)
    n_tiles = len(open_split(root / params.data.prepared_dir, "ms_pool", "ms").labels)
    assert pool_chunks(n_tiles, params.pairs) == [(0, n_tiles)]  # the default: one call
    whole = pool_pseudo_labels(root, params, n_tiles)
    text = (root / "params.yaml").read_text()
    text = text.replace("  chunk_tiles: 50000", "  chunk_tiles: 5").replace("  batch_size: 256 ", "  batch_size: 4 ")
    (root / "params.yaml").write_text(text)
    set_compute(root, workers=2, cell_threads=1)
    sliced = load_params(root)
    assert sliced.pairs.batch_size == 4 and len(pool_chunks(n_tiles, sliced.pairs)) >= 3
    assert pool_chunks(n_tiles, sliced.pairs)[0] == (0, 8)  # 5 tiles rounded up to two whole batches
    with temporary_settings({PREFECT_API_URL: prefect_api}):
        torch.testing.assert_close(pool_pseudo_labels(root, sliced, n_tiles), whole, rtol=0, atol=1e-6)
        again = run_stage("pairs", root)
    assert again["same_class_rate"] == one_pass["same_class_rate"]
    pd.testing.assert_frame_equal(pd.read_parquet(root / "artifacts" / "pairs" / PAIRS_FILE), pairs)
