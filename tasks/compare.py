"""compare stage (docs/methods.md §A.8): method A against its baselines and ablations, at every label budget.

Every variant of the chosen grid (`compare.grid` in params.yaml: K labels per class x variants)
trains for the grid's `seeds` seeds on the same data with the same optimiser steps, and is scored on
the same RGB test tiles. The difference of each variant to rgb_only comes with a 95 % paired
bootstrap interval over test tiles and seeds. Outputs: reports/compare.json (`by_k`), and in
reports/compare/ a markdown and a CSV table and the accuracy-against-K figure, all logged to MLflow.
`make run` runs the reduced grid; `make compare` the full one (`ms2rgb compare --grid full`).
The full method at the student's K and the params seed is the production student itself (same run
identity), read from artifacts/student rather than trained again. The stage registers nothing; a
retrain after new scenes skips it.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from ms2rgb.models.classifier import SceneCNN
from ms2rgb.tasks.config import CompareGrid, Params
from ms2rgb.tasks.data.artifacts import model_path
from ms2rgb.tasks.data.atomic import write_atomic
from ms2rgb.tasks.data.validated import require_validated
from ms2rgb.tasks.report.compare import accuracy_by_k_figure, compare_markdown, compare_summary, compare_table
from ms2rgb.tasks.tracking import StageTracker
from ms2rgb.tasks.training.distill import train_student
from ms2rgb.tasks.training.inference import predict_logits
from ms2rgb.tasks.training.loop import fingerprint
from ms2rgb.tasks.training.parallel import ProcessLocal, run_all
from ms2rgb.tasks.training.progress import epoch_printer
from ms2rgb.tasks.training.store import load_model
from ms2rgb.tasks.training.student_data import READS, StudentInputs, upstream_identity
from ms2rgb.tasks.training.variants import BASELINE, FULL_METHOD, VARIANTS

REPORTS = Path("reports")
STAGE_GRID_FOLDER = "compare"  # the stage's outputs (DVC); another grid writes reports/compare-<grid>/


def out_folder(root: Path, grid_name: str, staged: bool) -> Path:
    """Where a grid's tables and figure go: the stage's own folder, or one per grid run by hand."""
    return root / REPORTS / (STAGE_GRID_FOLDER if staged else f"compare-{grid_name}")


def k_name(k: int | None) -> str:
    """The report key of a label budget: "5", "25", ..., "all"."""
    return "all" if k is None else str(k)


def production_student(inputs: StudentInputs, name: str, k: int | None, seed: int) -> SceneCNN | None:
    """The student stage's model when it is exactly this (variant, K, seed) on this data and
    config (same run identity), so the comparison does not train it a second time."""
    report, model = inputs.root / REPORTS / "student.json", model_path(inputs.root, "student")
    if name != FULL_METHOD or not report.is_file() or not model.is_file():
        return None
    if json.loads(report.read_text()).get("run_identity") != fingerprint(inputs.identity, name, seed, k):
        return None
    return load_model(model, "scene_cnn", "student")


# One process's StudentInputs for the (root, identity) it last served: the serial grid and every worker
# process load the tiles and teacher-encode the MS pool once. The identity names the student config, the
# validated data and the upstream models (upstream_identity).
INPUTS: ProcessLocal[StudentInputs] = ProcessLocal()


def student_inputs(root: Path, params: Params, identity: str) -> StudentInputs:
    def build() -> StudentInputs:
        inputs = StudentInputs(root, params)
        inputs.identity = identity
        return inputs

    return INPUTS.get(f"{root}|{identity}", build)


def correctness(
    root: Path, params: Params, identity: str, name: str, k: int | None, seed: int, scratch: Path
) -> np.ndarray:
    """Train one (variant, K, seed), or reuse the production student, and return its (N,) per-test-tile
    correctness. One cell of the grid: it reads its inputs itself, so it can run in another process."""
    inputs = student_inputs(root, params, identity)
    label = f"{name}/k{k_name(k)}/seed{seed}"
    reused = production_student(inputs, name, k, seed)
    if reused is not None:
        print(f"compare: {label}: the production student (same data, config and seed), not trained again", flush=True)
        return score(reused, inputs, label)
    variant = VARIANTS[name]
    data, truth = inputs.data_for(variant, seed, k)
    run = train_student(
        variant,
        data,
        params.student,
        inputs.arch,
        seed,
        truth,
        scratch / label,  # resumable after a kill, like the production student
        epoch_printer(label) if params.student.steps >= 200 else None,
        fingerprint(inputs.identity, label),
    )
    return score(run.model, inputs, label)


def score(model: SceneCNN, inputs: StudentInputs, label: str) -> np.ndarray:
    """(N,) 1.0 where `model` gets an RGB test tile right."""
    pred = predict_logits(model, inputs.test.images).argmax(1).numpy()
    right = (pred == inputs.test.labels).astype(np.float64)
    print(f"compare: {label}: RGB test accuracy {right.mean():.3f}", flush=True)
    return right


def trained_k(name: str, k: int | None) -> tuple[str, int | None]:
    """The cell that answers (variant, K): a variant that sees every label (the oracle) ignores K."""
    return name, None if VARIANTS[name].every_label else k


def run_grid(
    root: Path, params: Params, identity: str, grid: CompareGrid, scratch: Path
) -> dict[str, dict[str, np.ndarray]]:
    """K name -> variant -> (seeds, N) correctness. Cells run on params' `compute` task runner (one after
    another by default); the oracle ignores K, so it trains once per seed."""
    seeds = [params.seed + s for s in range(grid.seeds)]
    cells = list(dict.fromkeys(trained_k(name, k) for k in grid.shots for name in grid.variants))
    runs = [(name, k, seed) for name, k in cells for seed in seeds]
    calls = [
        {"root": root, "params": params, "identity": identity, "name": name, "k": k, "seed": seed, "scratch": scratch}
        for name, k, seed in runs
    ]
    names = [f"{name}/k{k_name(k)}/seed{seed}" for name, k, seed in runs]
    results = iter(run_all(correctness, calls, names, params.compute))
    by_cell = {cell: np.stack([next(results) for _ in seeds]) for cell in cells}
    return {k_name(k): {name: by_cell[trained_k(name, k)] for name in grid.variants} for k in grid.shots}


def write_outputs(folder: Path, summary: dict[str, Any], tracker: StageTracker) -> dict[str, Path]:
    """The markdown and CSV tables and the figure in `folder`, each logged to the stage run."""
    folder.mkdir(parents=True, exist_ok=True)
    table = compare_table(summary)
    paths = {
        "markdown": write_atomic(folder / "compare.md", lambda tmp: tmp.write_text(compare_markdown(summary))),
        "csv": write_atomic(folder / "compare.csv", lambda tmp: table.to_csv(tmp, index=False)),
    }
    figure = accuracy_by_k_figure(summary)
    paths["figure"] = write_atomic(folder / "accuracy_by_k.png", lambda tmp: figure.savefig(tmp, format="png", dpi=120))
    tracker.log_figure(figure, "compare/accuracy_by_k.png")
    tracker.log_table(table, "compare")
    for path in paths.values():
        tracker.log_artifact(path, "compare")
    return paths


def compare(root: Path, params: Params, tracker: StageTracker, grid_name: str, staged: bool = True) -> dict[str, Any]:
    """Run grid `grid_name` of params.yaml's compare section; the report (compare.json's content).
    `staged`: the DVC stage's run, whose tables go to reports/compare/."""
    start = time.perf_counter()
    data_digest = require_validated(root, root / params.data.prepared_dir, READS)
    grid = params.compare.grids[grid_name]
    tracker.log_params(
        {
            "compare": params.compare.model_dump(),
            "student": params.student.model_dump(),
            "cell_threads": params.compute.cell_threads,  # the cells' numbers depend on it, unlike `workers`
        }
    )
    identity = upstream_identity(root, params, data_digest)
    scratch = root / "artifacts" / f"compare-{grid_name}.partial"  # checkpoints only; removed after success
    try:
        correct = run_grid(root, params, identity, grid, scratch)
    finally:
        INPUTS.clear()  # a served process runs many stages: do not keep the tiles
    summary = compare_summary(correct, BASELINE, params.compare.bootstrap, params.seed)
    write_outputs(out_folder(root, grid_name, staged), summary, tracker)
    print(compare_markdown(summary), flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
    return summary | {
        "grid": grid_name,
        "seeds": grid.seeds,
        "test_tiles": correct[k_name(grid.shots[0])][grid.variants[0]].shape[1],
        "seconds": round(time.perf_counter() - start, 1),
    }


def run(root: Path, params: Params, tracker: StageTracker) -> dict[str, Any]:
    """Stage entry point (DVC and Prefect call this alike): the grid named by compare.grid."""
    return compare(root, params, tracker, params.compare.grid)
