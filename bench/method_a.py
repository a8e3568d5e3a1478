"""Time method A's training on the current project: teacher, matcher and the student (full method, one seed).

Usage: python bench/method_a.py [--root .]
Needs a prepared project on which the pairs stage has run (e.g. after `ms2rgb run`): the student
reads the teacher and the pairs table from artifacts/. Trains in process with the params.yaml
settings and the params seed, without MLflow logging and without writing artifacts, then prints
seconds per stage, their total against the 5-minute budget, and the peak resident memory.
The baselines and ablations of the student stage (5 variants x seeds, plus 2 more seeds of the
full method) come on top; each costs about as much as the full method's run or less.
"""

from __future__ import annotations

import argparse
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ms2rgb.models.bands import S2_BANDS
from ms2rgb.models.classifier import SceneCNN
from ms2rgb.tasks.config import load_params
from ms2rgb.tasks.data.classes import SCENE_NAMES
from ms2rgb.tasks.data.pairing import load_true_pairs
from ms2rgb.tasks.matcher import train as train_matcher
from ms2rgb.tasks.student import StudentInputs, student_arch
from ms2rgb.tasks.teacher import fit_config, labelled_ms
from ms2rgb.tasks.training.distill import FULL_METHOD, VARIANTS, budget_epochs, train_student
from ms2rgb.tasks.training.inference import predict_logits, retrieval
from ms2rgb.tasks.training.loop import fit_classifier, seed_everything
from ms2rgb.tasks.training.metrics import accuracy_report

BUDGET_S = 300.0


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(name: str, fn: Callable[[], str], results: dict[str, float]) -> None:
    start = time.perf_counter()
    outcome = fn()
    results[name] = time.perf_counter() - start
    print(f"{name:8s} {results[name]:7.1f} s  peak RSS {peak_rss_mib():7.0f} MiB  {outcome}", flush=True)


def bench_teacher(prepared: Path, params: dict[str, Any], seed: int) -> str:
    cfg = params.teacher
    train, test = labelled_ms(prepared, "ms_train"), labelled_ms(prepared, "test")
    seed_everything(seed)
    model = SceneCNN(cfg.model(S2_BANDS))
    fit_classifier(model, np.asarray(train.images), train.labels, fit_config(cfg), seed, augment=cfg.augment)
    report = accuracy_report(predict_logits(model, test.images), test.labels, SCENE_NAMES)
    return f"MS test accuracy {report['accuracy']:.3f} ({cfg.epochs} epochs)"


def bench_matcher(prepared: Path, params: dict[str, Any], seed: int) -> str:
    cfg = params.matcher
    matcher, _ = train_matcher(load_true_pairs(prepared, "pair_train"), cfg, seed)
    metrics = retrieval(matcher, load_true_pairs(prepared, "pair_test"))
    return f"pair_top1 {metrics['pair_top1']:.3f}, pair_top5 {metrics['pair_top5']:.3f} ({cfg.epochs} epochs)"


def bench_student(root: Path, params: dict[str, Any], seed: int) -> str:
    cfg = params.student
    inputs = StudentInputs(root, params)
    full = next(v for v in VARIANTS if v.name == FULL_METHOD)
    data = inputs.data_for(full, seed)
    run = train_student(
        full,
        data,
        cfg,
        student_arch(inputs.teacher.cfg),
        seed,
        budget_epochs(cfg, len(inputs.rgb.labels), len(data.labels)),
    )
    report = accuracy_report(predict_logits(run.model, inputs.test.images), inputs.test.labels, SCENE_NAMES)
    return f"RGB test accuracy {report['accuracy']:.3f} ({cfg.epochs} epochs, {len(run.rounds)} re-matching rounds)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=".")
    args = parser.parse_args()
    root = Path(args.root).resolve()
    params = load_params(root)
    prepared, seed = root / params.data.prepared_dir, params.seed
    results: dict[str, float] = {}
    timed("teacher", lambda: bench_teacher(prepared, params, seed), results)
    timed("matcher", lambda: bench_matcher(prepared, params, seed), results)
    timed("student", lambda: bench_student(root, params, seed), results)
    total = sum(results.values())
    verdict = "within" if total <= BUDGET_S else "OVER"
    print(
        f"total    {total:7.1f} s  ({verdict} the {BUDGET_S:.0f} s budget; profile {params.get('profile')}, "
        f"peak RSS {peak_rss_mib():.0f} MiB)"
    )


if __name__ == "__main__":
    main()
