"""Both methods on the `floors` profile of params.yaml, run as the pipeline runs them, minus tracking.

The quality floors (tests/test_quality_floors.py) need models trained the way the stages train them,
on data drawn the way `prepare` draws it, but not MLflow or Prefect: each stage's own `run` is
called with a tracker that records nothing, and its outputs are swapped in as the stage runner
does. `validate` is replaced by its stamps (the synthetic set's validity is other tests' business),
so the floors time only training. The detector goes through the
detector stage's own functions (backbone, load_context, score_seed) at one K and one seed instead of its plan.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ms2rgb.flows.stages import stage_function, write_report
from ms2rgb.tasks.config import Params
from ms2rgb.tasks.data.artifacts import stage_dir, staging_dir
from ms2rgb.tasks.data.atomic import swap_in_dir
from ms2rgb.tasks.data.legend import read_legend
from ms2rgb.tasks.data.manifest import read_manifest
from ms2rgb.tasks.data.validated import write_stamps
from ms2rgb.tasks.detection.plan import FULL_MODE, PURE_METHOD, Variant
from ms2rgb.tasks.detector import backbone, load_context, score_seed
from ms2rgb.tasks.training.loop import make_deterministic, pick_device

METHOD_A = ("prepare", "teacher", "matcher", "pairs", "student", "compare")  # in DAG order, validate aside


class Untracked:
    """A StageTracker that records nothing: every logging call is a no-op returning None."""

    @contextlib.contextmanager
    def child(self, name: str, tags: dict[str, str] | None = None) -> Iterator[Untracked]:
        yield self

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


def run_untracked(name: str, root: Path, params: Params) -> dict[str, Any]:
    """One stage as flows/stages.run_stage runs it (deterministic threads, outputs swapped in whole),
    and its report written, without an MLflow run; `prepare` is followed by the stamps a passed
    `validate` leaves."""
    make_deterministic(params.threads)
    report = stage_function(name)(root, params, Untracked())  # type: ignore[arg-type]
    if staging_dir(root, name).exists():
        swap_in_dir(staging_dir(root, name), stage_dir(root, name))
    if name == "prepare":
        write_stamps(root, read_manifest(root / params.data.prepared_dir / "manifest.parquet"))
    write_report(root, name, report)  # compare reuses the production student by the run identity in it
    return report


def detector_miou(root: Path, params: Params) -> dict[str, float]:
    """mIoU on seg_test of zero-shot, of the coupled prompts alone tuned at the largest K ("coupled"),
    of the full method with the pixel evidence ("with_evidence") and of the pixel forest, at the
    params seed, on the backbone the detector stage would use (the fallback pretrained on captions). Needs
    `prepare` to have run at `root`. Goes through the stage's own load_context and score_seed, one variant
    and one seed each instead of the stage's plan."""
    make_deterministic(params.threads)
    settings, seed, device = params.detector, params.seed, pick_device()
    prepared, out_dir = root / params.data.prepared_dir, root / "artifacts" / "detector-floors"
    classes = read_legend(prepared)
    untracked = Untracked()
    clip, tokenizer, _ = backbone(root, params, out_dir, classes, untracked, device)  # type: ignore[arg-type]
    ctx = load_context(root, params, clip, tokenizer, out_dir, device)
    make_deterministic(params.compute.cell_threads)  # the stage's cells run on these threads
    k = max(settings.shots)
    variants = {
        "zero_shot": Variant("zero_shot", "prompts", "zero_shot", 0, (seed,)),
        "coupled": Variant(PURE_METHOD, "prompts", FULL_MODE, k, (seed,), pixel_evidence=False),
        "with_evidence": Variant(f"full_k{k}", "prompts", FULL_MODE, k, (seed,)),
        "pixel_forest": Variant("pixel_forest", "pixel_forest", "", k, (seed,), pixel_evidence=False),
    }
    return {name: float(score_seed(ctx, variant, seed)[0]["miou"]) for name, variant in variants.items()}
