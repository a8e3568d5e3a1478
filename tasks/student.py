"""student stage (docs/methods.md §A.4–§A.7): the distilled RGB student, compared with baselines and ablations.

Every variant in `distill_train.VARIANTS` runs for `student.seeds` seeds on the same data and
budget, each variant in its own nested MLflow run. The full method at the params seed is the
product: artifacts/student/model.pt, per-epoch checkpoints in artifacts/student/checkpoints/,
registered as `ms2rgb-student`. reports/student.json holds the full method's test accuracy and
the baselines' mean and std over seeds, with per-class accuracy.
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ms2rgb.models.bands import RGB_BANDS, S2_BANDS
from ms2rgb.models.classifier import SceneCNN, SceneCNNConfig
from ms2rgb.tasks.config import Params, StudentConfig
from ms2rgb.tasks.data.artifacts import MODEL_FILE, model_path, stage_dir, staging_dir
from ms2rgb.tasks.data.cache import CachedSplit, open_split, require_bands
from ms2rgb.tasks.data.classes import SCENE_NAMES
from ms2rgb.tasks.data.geotiff import sha256_of
from ms2rgb.tasks.data.pairing import PAIRS_FILE, load_true_pairs, read_pairs
from ms2rgb.tasks.data.validated import require_validated
from ms2rgb.tasks.errors import DataError
from ms2rgb.tasks.tracking import StageTracker
from ms2rgb.tasks.tracking.pyfunc import MODEL_ARTIFACT, SceneClassifierPyfunc
from ms2rgb.tasks.training import plots
from ms2rgb.tasks.training.distill import (
    FULL_METHOD,
    VARIANTS,
    StudentRun,
    StudentSet,
    Variant,
    budget_epochs,
    random_partners,
    teacher_bank,
    train_student,
)
from ms2rgb.tasks.training.inference import predict_logits
from ms2rgb.tasks.training.loop import fingerprint, to_tensor
from ms2rgb.tasks.training.metrics import accuracy_report
from ms2rgb.tasks.training.progress import epoch_printer, log_curves, log_evaluation, log_history
from ms2rgb.tasks.training.store import load_model, save_model

REGISTERED_NAME = "ms2rgb-student"
# split -> modalities (dvc.yaml lists exactly their files): RGB train/test, the MS pool, true pairs.
READS = {"rgb_train": ("rgb",), "test": ("rgb",), "ms_pool": ("ms",), "pair_train": ("ms", "rgb")}


def student_arch(teacher: SceneCNNConfig) -> SceneCNNConfig:
    """The teacher's architecture on the RGB bands: equal feature maps at the distilled layer (A.4)."""
    return replace(teacher, bands=RGB_BANDS, from_8bit=True)


class StudentInputs:
    """Everything the variants train and test on, loaded and teacher-encoded once."""

    def __init__(self, root: Path, params: Params) -> None:
        prepared = root / params.data.prepared_dir
        self.teacher: SceneCNN = load_model(model_path(root, "teacher"), "scene_cnn", "teacher")
        if self.teacher.bands != S2_BANDS:
            raise DataError(
                model_path(root, "teacher"),
                f"the teacher reads bands {self.teacher.bands}",
                f"the teacher must read the 13 MS bands {S2_BANDS}; re-run the teacher stage",
            )
        self.rgb = self._labelled(open_split(prepared, "rgb_train", "rgb"), "rgb_train")
        self.test = self._labelled(open_split(prepared, "test", "rgb"), "test")
        pool = require_bands(open_split(prepared, "ms_pool", "ms"), S2_BANDS, "ms_pool/ms")
        self.matched = read_pairs(stage_dir(root, "pairs") / PAIRS_FILE, self.rgb.ids, pool.ids)
        self.pool_bank = teacher_bank(self.teacher, np.asarray(pool.images), pool.labels)
        self.true_pairs = load_true_pairs(prepared, "pair_train")
        self.pair_bank = teacher_bank(self.teacher, self.true_pairs.ms, self.true_pairs.labels)
        self.rgb_images = np.asarray(self.rgb.images)
        self.identity = ""  # names the data, upstream models and config: set by the stage for resumable runs

    @staticmethod
    def _labelled(split: CachedSplit, name: str) -> CachedSplit:
        require_bands(split, RGB_BANDS, f"{name}/rgb")
        if (split.labels < 0).any():
            raise DataError(
                name,
                f"{int((split.labels < 0).sum())} RGB tile(s) have no class",
                "the student's train and test tiles must be labelled; re-run prepare",
            )
        return split

    def data_for(self, variant: Variant, seed: int) -> StudentSet:
        """The training set of one variant: its RGB tiles and their initial MS partners."""
        if variant.partners == "true":  # same-location pairs: only pair_train has them
            pairs = self.true_pairs
            return StudentSet(pairs.rgb, pairs.labels, self.pair_bank, np.arange(len(pairs.labels)))
        labels = self.rgb.labels
        if variant.partners == "none":
            return StudentSet(self.rgb_images, labels, None, None)
        partners = self.matched if variant.partners == "matched" else random_partners(labels, self.pool_bank, seed)
        return StudentSet(self.rgb_images, labels, self.pool_bank, partners)


def summarise(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sample std (ddof=1) of test accuracy over seeds, and the mean per-class accuracy."""
    acc = np.array([r["accuracy"] for r in reports])
    per_class = {c: float(np.mean([r["per_class"][c] for r in reports])) for c in reports[0]["per_class"]}
    return {
        "mean": float(acc.mean()),
        "std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
        "per_seed": acc.tolist(),
        "per_class": per_class,
    }


def comparison_table(summaries: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """One row per variant: mean, std, per-seed accuracies and per-class means."""
    rows = []
    for name, s in summaries.items():
        row = {
            "variant": name,
            "mean": round(s["mean"], 4),
            "std": round(s["std"], 4),
            "seeds": " ".join(f"{a:.3f}" for a in s["per_seed"]),
        }
        rows.append(row | {c: round(v, 3) for c, v in s["per_class"].items()})
    return pd.DataFrame(rows)


def run_variant(
    inputs: StudentInputs,
    variant: Variant,
    cfg: StudentConfig,
    seeds: list[int],
    tracker: StageTracker,
    checkpoint_dir: Path,
) -> tuple[dict[str, Any], StudentRun, dict[str, Any]]:
    """All seeds of one variant in a nested run; returns its summary and the first seed's run + report."""
    first: tuple[StudentRun, dict[str, Any]] | None = None
    reports = []
    with tracker.child(f"student/{variant.name}", tags={"ms2rgb.variant": variant.name}) as child:
        child.log_params({"variant": asdict(variant), "student": cfg.model_dump(), "seeds": seeds})
        for seed in seeds:
            data = inputs.data_for(variant, seed)
            epochs = budget_epochs(cfg, len(inputs.rgb.labels), len(data.labels))
            run = train_student(
                variant,
                data,
                cfg,
                student_arch(inputs.teacher.cfg),
                seed,
                epochs,
                checkpoint_dir / variant.name / f"seed{seed}",  # every run resumable after a kill
                epoch_printer(f"{variant.name}/seed{seed}"),
                fingerprint(inputs.identity, variant.name, seed, epochs),
            )
            report = accuracy_report(predict_logits(run.model, inputs.test.images), inputs.test.labels, SCENE_NAMES)
            print(f"student {variant.name} seed {seed}: RGB test accuracy {report['accuracy']:.3f}", flush=True)
            child.log_metrics({f"seed{seed}.test_accuracy": report["accuracy"]})
            log_history(child, run.history, f"seed{seed}.")
            for r in run.rounds:
                child.log_metrics(
                    {
                        f"seed{seed}.rematch_changed": r.changed,
                        f"seed{seed}.rematch_same_class_rate": r.same_class_rate,
                    },
                    step=r.epoch,
                )
            reports.append(report)
            first = first or (run, report)
        summary = summarise(reports)
        child.log_metrics({"test_accuracy_mean": summary["mean"], "test_accuracy_std": summary["std"]})
        child.log_table(comparison_table({variant.name: summary}), f"{variant.name}_accuracy")
    assert first is not None, "seeds is never empty (student.seeds >= 1)"
    return summary, first[0], first[1]


def log_product(
    tracker: StageTracker, run: StudentRun, report: dict[str, Any], summaries: dict[str, dict[str, Any]]
) -> None:
    """Figures and tables of the stage run: the registered student and the comparison."""
    log_curves(tracker, run.history, "student (full method)", "student/training_curves.png")
    terms = {name: [t.get(name, 0.0) for t in run.terms] for name in ("feat", "kd", "ce")}
    tracker.log_figure(plots.training_curves(terms, "student loss terms (unweighted)"), "student/loss_terms.png")
    log_evaluation(tracker, report, "student (RGB test)", "student")
    if run.rounds:
        rounds = plots.rematch_rounds(
            [r.epoch for r in run.rounds], [r.changed for r in run.rounds], [r.same_class_rate for r in run.rounds]
        )
        tracker.log_figure(rounds, "student/rematch_rounds.png")
    tracker.log_table(comparison_table(summaries), "student_comparison")
    tracker.log_figure(
        plots.comparison_bars(
            {k: s["mean"] for k, s in summaries.items()},
            {k: s["std"] for k, s in summaries.items()},
            "RGB test accuracy, mean +- std over seeds",
        ),
        "student/comparison.png",
    )
    tracker.log_figure(
        plots.per_class_bars(
            {k: s["per_class"] for k, s in summaries.items()}, "per-class RGB test accuracy (mean over seeds)"
        ),
        "student/comparison_per_class.png",
    )


def run(root: Path, params: Params, tracker: StageTracker) -> dict[str, Any]:
    """Stage entry point (DVC and Prefect call this alike)."""
    start = time.perf_counter()
    cfg, seed = params.student, params.seed
    seeds = [seed + k for k in range(cfg.seeds)]
    data_digest = require_validated(root, root / params.data.prepared_dir, READS)
    inputs = StudentInputs(root, params)
    upstream = [sha256_of(model_path(root, "teacher")), sha256_of(stage_dir(root, "pairs") / PAIRS_FILE)]
    inputs.identity = fingerprint(cfg.model_dump(), data_digest, upstream)
    tracker.log_params({"student": cfg.model_dump(), "seed": seed})
    out = staging_dir(root, "student")  # swapped in whole by the stage runner after success
    summaries: dict[str, dict[str, Any]] = {}
    firsts: dict[str, tuple[StudentRun, dict[str, Any]]] = {}
    for variant in VARIANTS:
        summary, first_run, first_report = run_variant(inputs, variant, cfg, seeds, tracker, out / "checkpoints")
        summaries[variant.name], firsts[variant.name] = summary, (first_run, first_report)
    product, product_report = firsts[FULL_METHOD]
    save_model(out / MODEL_FILE, "scene_cnn", product.model, product.model.cfg)
    log_product(tracker, product, product_report, summaries)
    version = tracker.log_pyfunc_model(  # weights as the model.pt artifact; serves softmax probabilities
        SceneClassifierPyfunc(),
        {MODEL_ARTIFACT: out / MODEL_FILE},
        to_tensor(inputs.test.images, np.arange(2)).numpy(),
        REGISTERED_NAME,
        metadata={"class_names": list(SCENE_NAMES)},
    )
    full, rgb_only = summaries[FULL_METHOD], summaries["rgb_only"]
    gain, spread = full["mean"] - rgb_only["mean"], full["std"] + rgb_only["std"]
    print(
        f"student: full method {full['mean']:.3f} +- {full['std']:.3f} vs RGB-only {rgb_only['mean']:.3f} "
        f"+- {rgb_only['std']:.3f} (gain {gain:+.3f}, spread {spread:.3f})",
        flush=True,
    )
    return {
        "test_accuracy": full["mean"],
        "test_accuracy_std": full["std"],
        "per_class": full["per_class"],
        "seeds": seeds,
        "registered_seed": seed,
        "registered_test_accuracy": product_report["accuracy"],
        "gain_over_rgb_only": gain,
        "seed_spread": spread,
        "beats_rgb_only": bool(gain > spread),
        "full_method": full,
        "baselines": {k: v for k, v in summaries.items() if k != FULL_METHOD},
        "rematch_rounds": [r.__dict__ for r in product.rounds],
        "epochs": cfg.epochs,
        "model_version": int(version or 0),
        "seconds": round(time.perf_counter() - start, 2),
    }
