"""Time method A's production path (teacher, matcher, pairs, student) and the compare stage.

Usage: python bench/method_a.py [--root .] [--compare]
Needs a project whose data is prepared and validated (e.g. after `make run`). The stages run for
real, as `ms2rgb stage <name>` runs them, but in a scratch copy of the project (data/prepared,
reports/validate, params.yaml) with its own MLflow store, so the project's models, reports and
registry are left as they were. Prints seconds and peak resident memory per stage, the production
path's total against its 3-minute budget and, with --compare, the compare stage's time against
what is left of `make run`'s 10 minutes.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

PRODUCTION = ("teacher", "matcher", "pairs", "student")
PRODUCTION_BUDGET_S = 180.0
COPIED = ("data/prepared", "reports/validate", "params.yaml")


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def scratch_project(root: Path, into: Path) -> Path:
    """A copy of what the stages read, with a fresh MLflow store inside it."""
    for rel in COPIED:
        source, target = root / rel, into / rel
        if not source.exists():
            raise SystemExit(f"{source} is missing: run `make run` (or `ms2rgb run --until validate`) first")
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, target)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{into / 'mlflow.db'}"
    return into


def headline(name: str, report: dict) -> str:
    """The one number of each stage worth printing beside its time."""
    picks = {
        "teacher": ("MS test accuracy", "test_accuracy"),
        "matcher": ("pair top-1", "pair_top1"),
        "pairs": ("same-class rate", "same_class_rate"),
        "student": ("RGB test accuracy", "test_accuracy"),
    }
    if name not in picks:
        return ""
    label, key = picks[name]
    value = report.get(key)
    return f"{label} {value:.3f}" if isinstance(value, float) else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=".")
    parser.add_argument("--compare", action="store_true", help="time the compare stage (its params grid) too")
    args = parser.parse_args()
    from ms2rgb.flows.stages import run_stage  # after MLFLOW_TRACKING_URI points at the scratch store

    stages = (*PRODUCTION, "compare") if args.compare else PRODUCTION
    with tempfile.TemporaryDirectory(prefix="ms2rgb-bench-") as tmp:
        project = scratch_project(Path(args.root).resolve(), Path(tmp))
        seconds: dict[str, float] = {}
        for name in stages:
            start = time.perf_counter()
            report = run_stage(name, project)
            seconds[name] = time.perf_counter() - start
            print(f"{name:8s} {seconds[name]:7.1f} s  peak RSS {peak_rss_mib():6.0f} MiB  {headline(name, report)}")
    production = sum(seconds[n] for n in PRODUCTION)
    verdict = "within" if production <= PRODUCTION_BUDGET_S else "OVER"
    print(f"production path {production:.1f} s ({verdict} its {PRODUCTION_BUDGET_S:.0f} s budget)")
    if args.compare:
        print(f"compare stage {seconds['compare']:.1f} s")


if __name__ == "__main__":
    main()
