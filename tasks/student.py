"""student stage (docs/methods.md §A.4–§A.7): the production RGB student, distilled by the full method.

One run of the full method at the params seed, with `student.rgb_labels_per_class` labels per class
(the other rgb_train tiles train without their label, through their matched MS partner). The
baselines and ablations are the `compare` stage's, so a retrain after new scenes trains only this.
Outputs: artifacts/student/model.pt, checkpoints in artifacts/student/checkpoints/, registered as
`<tracking.model_prefix>-student`; reports/student.json with the RGB test accuracy (95 % bootstrap interval),
per-class accuracy and the re-matching rounds (pseudo-label accuracy, share changed).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from ms2rgb.tasks.config import Params, model_name
from ms2rgb.tasks.data.artifacts import MODEL_FILE, staging_dir
from ms2rgb.tasks.data.classes import SCENE_NAMES
from ms2rgb.tasks.data.validated import require_validated
from ms2rgb.tasks.tracking import StageTracker
from ms2rgb.tasks.tracking.pyfunc import MODEL_ARTIFACT, SceneClassifierPyfunc
from ms2rgb.tasks.training import plots
from ms2rgb.tasks.training.distill import StudentRun, train_student
from ms2rgb.tasks.training.inference import predict_logits
from ms2rgb.tasks.training.loop import fingerprint, to_tensor
from ms2rgb.tasks.training.metrics import accuracy_report, bootstrap_ci
from ms2rgb.tasks.training.progress import epoch_printer, log_curves, log_evaluation, log_history
from ms2rgb.tasks.training.store import save_model
from ms2rgb.tasks.training.student_data import READS, StudentInputs, upstream_identity
from ms2rgb.tasks.training.variants import FULL_METHOD, VARIANTS

BOOTSTRAP = 2000  # resamples of the test tiles for the interval printed here (evaluate uses its own param)


def log_run(tracker: StageTracker, run: StudentRun, report: dict[str, Any]) -> None:
    """Curves, loss terms, re-matching rounds and the test evaluation of the production student."""
    log_history(tracker, run.history)
    log_curves(tracker, run.history, "student (full method)", "student/training_curves.png")
    terms = {name: [t.get(name, 0.0) for t in run.terms] for name in ("feat", "kd", "ce")}
    tracker.log_figure(plots.training_curves(terms, "student loss terms (unweighted)"), "student/loss_terms.png")
    log_evaluation(tracker, report, "student (RGB test)", "student")
    for r in run.rounds:
        tracker.log_metrics(
            {"rematch_changed": r.changed, "rematch_same_class_rate": r.same_class_rate}
            | (
                {"rematch_pseudo_label_accuracy": r.pseudo_label_accuracy}
                if r.pseudo_label_accuracy is not None
                else {}
            ),
            step=r.epoch,
        )
    if run.rounds:
        rounds = plots.rematch_rounds(
            [r.epoch for r in run.rounds], [r.changed for r in run.rounds], [r.same_class_rate for r in run.rounds]
        )
        tracker.log_figure(rounds, "student/rematch_rounds.png")


def run(root: Path, params: Params, tracker: StageTracker) -> dict[str, Any]:
    """Stage entry point (DVC and Prefect call this alike)."""
    start = time.perf_counter()
    cfg, seed = params.student, params.seed
    data_digest = require_validated(root, root / params.data.prepared_dir, READS)
    inputs = StudentInputs(root, params)
    tracker.log_params({"student": cfg.model_dump(), "seed": seed})
    out = staging_dir(root, "student")  # swapped in whole by the stage runner after success
    variant, k = VARIANTS[FULL_METHOD], cfg.rgb_labels_per_class
    data, truth = inputs.data_for(variant, seed, k)
    identity = fingerprint(upstream_identity(root, params, data_digest), variant.name, seed, k)
    run = train_student(
        variant, data, cfg, inputs.arch, seed, truth, out / "checkpoints", epoch_printer("student"), identity
    )
    logits = predict_logits(run.model, inputs.test.images)
    report = accuracy_report(logits, inputs.test.labels, SCENE_NAMES)
    correct = (logits.argmax(1).numpy() == inputs.test.labels).astype(np.float64)
    low, high = bootstrap_ci(correct, BOOTSTRAP, seed)
    save_model(out / MODEL_FILE, "scene_cnn", run.model, run.model.cfg)
    log_run(tracker, run, report)
    version = tracker.log_pyfunc_model(  # weights as the model.pt artifact; serves softmax probabilities
        SceneClassifierPyfunc(),
        {MODEL_ARTIFACT: out / MODEL_FILE},
        to_tensor(inputs.test.images, np.arange(2)).numpy(),
        model_name(params.tracking.model_prefix, "student"),
        metadata={"class_names": list(SCENE_NAMES)},
    )
    labelled = int((data.labels >= 0).sum())
    print(
        f"student: RGB test accuracy {report['accuracy']:.3f} [{low:.3f}, {high:.3f}] on {len(correct)} tiles, "
        f"trained with {labelled} labelled and {len(data.labels) - labelled} unlabelled tiles",
        flush=True,
    )
    return {
        "test_accuracy": report["accuracy"],
        "test_accuracy_ci95": [low, high],
        "test_tiles": len(correct),
        "per_class": report["per_class"],
        "labelled_tiles": labelled,
        "unlabelled_tiles": len(data.labels) - labelled,
        "rgb_labels_per_class": k,
        "seed": seed,
        "rematch_rounds": [r.__dict__ for r in run.rounds],
        "steps": cfg.steps,
        "run_identity": identity,  # lets the compare stage reuse this run as full_method's
        "model_version": int(version or 0),
        "seconds": round(time.perf_counter() - start, 2),
    }
