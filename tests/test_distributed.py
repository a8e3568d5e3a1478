"""Training across processes (compute.nproc, tasks/training/distributed.py): real torchrun, real gloo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from conftest import REPO
from helpers_method_a import staged_project
from mlflow.tracking import MlflowClient

from ms2rgb.flows.stages import run_stage
from ms2rgb.tasks.training.distributed import DISTRIBUTED_STAGES, rows_of
from ms2rgb.tasks.training.store import load_model

HERE = Path(__file__).resolve().parent
# Measured: 2.0e-6 at most on SceneCNN weights of magnitude up to 1.4 after 16 steps, 4.1e-6 on prompts of
# magnitude up to 0.14 after 6 steps (float32 sums in another order, then AdamW's normalised steps).
WEIGHT_TOLERANCE = 1e-5


@pytest.mark.parametrize("n_rows", [1, 6, 30, 31])
@pytest.mark.parametrize("processes", [1, 2, 3])
def test_the_processes_slices_cover_a_batch_once_in_order(n_rows: int, processes: int) -> None:
    slices = [rows_of(n_rows, p, processes) for p in range(processes)]
    assert [i for s in slices for i in range(n_rows)[s]] == list(range(n_rows))
    sizes = [s.stop - s.start for s in slices]
    assert max(sizes) - min(sizes) <= 1


def test_the_stages_that_train_on_several_processes_and_only_they_have_compute_nproc_as_a_dvc_param() -> None:
    """Their float sums change with the process count, so DVC must rerun them when it changes."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    listed = {name for name, stage in stages.items() if "compute.nproc" in stage.get("params", [])}
    assert listed == set(DISTRIBUTED_STAGES)


def train(out: Path, processes: int, *extra: str) -> dict[str, object]:
    """helpers_ddp.py alone or under torchrun; the weights and epoch losses process 0 saved."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command = [*(launcher if processes > 1 else [sys.executable]), str(HERE / "helpers_ddp.py"), str(out), *extra]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out, weights_only=True) if out.exists() else {}


@pytest.mark.slow
def test_two_processes_train_what_one_process_trains_on_the_same_global_batch(tmp_path: Path) -> None:
    one, two = train(tmp_path / "one.pt", 1), train(tmp_path / "two.pt", 2)
    assert one["state"].keys() == two["state"].keys()
    for key, value in one["state"].items():  # batch-norm statistics and counters included
        torch.testing.assert_close(two["state"][key], value, atol=WEIGHT_TOLERANCE, rtol=0)
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), atol=1e-6, rtol=0)
    assert one["losses"][-1] < one["losses"][0]  # it learned something, so equal weights mean something


@pytest.mark.slow
def test_a_last_batch_of_one_tile_joins_the_batch_before_it_on_two_processes(tmp_path: Path) -> None:
    """91 tiles in batches of 30 leave one tile, which one of two processes could not split with the
    other (an empty slice's mean loss is NaN): it joins the third batch."""
    two = train(tmp_path / "two.pt", 2, "--tiles", "91")
    assert all(np.isfinite(loss) for loss in two["losses"])
    assert all(torch.isfinite(value.float()).all() for value in two["state"].values())


@pytest.mark.slow
def test_two_processes_tune_the_prompts_one_process_tunes(tmp_path: Path) -> None:
    """Focal + dice over the whole batch (not a mean of the slices' losses), one slice with a tile
    that has no labelled pixel: the same losses every step, the same prompts."""
    one, two = train(tmp_path / "one.pt", 1, "--tune"), train(tmp_path / "two.pt", 2, "--tune")
    assert len(one["losses"]) == len(two["losses"]) == 6
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), atol=1e-6, rtol=0)
    for key, value in one["state"].items():
        torch.testing.assert_close(two["state"][key], value, atol=WEIGHT_TOLERANCE, rtol=0)
    assert one["losses"][-1] < one["losses"][0]


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path: Path) -> None:
    whole = train(tmp_path / "whole.pt", 2)
    checkpoints = tmp_path / "checkpoints"
    assert train(tmp_path / "cut.pt", 2, "--checkpoints", str(checkpoints), "--stop-after", "2") == {}
    assert [p.name for p in checkpoints.iterdir()] == ["epoch_001.pt"]  # one writer, the newest kept
    resumed = train(tmp_path / "resumed.pt", 2, "--checkpoints", str(checkpoints))
    assert resumed["losses"] == whole["losses"]
    assert all(torch.equal(resumed["state"][k], v) for k, v in whole["state"].items())


def set_nproc(project: Path, nproc: int) -> None:
    params = project / "params.yaml"
    text = params.read_text()
    assert "  nproc: 1 " in text
    params.write_text(text.replace("  nproc: 1 ", f"  nproc: {nproc} ", 1))


def stage_runs(project: Path, stage: str) -> list[mlflow.entities.Run]:
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=["ms2rgb"], filter_string=f"tags.`ms2rgb.stage` = '{stage}'",
                              output_format="list")  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "after"), [("teacher", "validate"), ("student", "pairs"), ("detector", "validate")])
def test_a_stage_on_two_processes_logs_writes_and_registers_once(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, stage: str, after: str
) -> None:
    project = staged_project(tmp_path_factory, after, tmp_path / "project")
    runs_before = len(stage_runs(project, stage))
    set_nproc(project, 2)
    report = run_stage(stage, project)
    assert json.loads((project / "reports" / f"{stage}.json").read_text()) == report
    runs = stage_runs(project, stage)
    assert len(runs) == runs_before + 1 and runs[0].info.status == "FINISHED"
    versions = MlflowClient().search_model_versions(f"name='ms2rgb-{stage}'")
    assert [int(v.version) for v in versions if v.run_id == runs[0].info.run_id] == [
        max(int(v.version) for v in versions)
    ]
    out = project / "artifacts" / stage
    if stage == "detector":  # the tuned head; one last checkpoint per tuned variant and seed
        assert report["registered_model"] == f"ms2rgb-detector/{max(int(v.version) for v in versions)}"
        assert (out / "detector.pt").is_file() and len(list((out / "checkpoints").glob("*/seed*/last.pt"))) > 1
        return
    assert runs[0].data.metrics["test_accuracy"] == report["test_accuracy"]
    model = load_model(out / "model.pt", "scene_cnn", stage)
    assert all(type(m) is torch.nn.BatchNorm2d for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert len(list((out / "checkpoints").glob("epoch_*.pt"))) == 1
