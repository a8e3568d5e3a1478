"""Are two detector variants really apart? Score chosen variants over more seeds than the stage runs.

The detector stage scores its ablations over `detector.seeds` (2) seeds, and the method's variants
often differ by about one point, as much as two seeds do. This script re-scores chosen variants of
`tasks/detection/plan.py` at the largest K over N seeds on a project where the detector stage has
run, with the stage's own code, prepared tiles and frozen backbone (`artifacts/detector/`): mean,
sample standard deviation and every seed's mIoU, and the base / novel split of the legend. Nothing
is logged or written to the project (tuning checkpoints go to a temporary folder).
Usage: python bench/detector_seeds.py [--root .] [--seeds 5] [--variants full_k16,text_prompts]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from ms2rgb.tasks import detector
from ms2rgb.tasks.config import load_params
from ms2rgb.tasks.detection.model import OUT_DIR
from ms2rgb.tasks.detection.plan import Variant, plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=".")
    parser.add_argument("--seeds", type=int, default=5, help="seeds per variant, from params' seed on")
    parser.add_argument("--variants", default="full_k16,text_prompts", help="comma-separated plan names")
    args = parser.parse_args()
    root = Path(args.root).resolve()
    params = load_params(root)
    params = params.model_copy(update={"detector": params.detector.model_copy(update={"seeds": args.seeds})})
    stage_dir = root / OUT_DIR
    if not (stage_dir / "backbone.pt").is_file():
        raise SystemExit(f"{stage_dir}/backbone.pt is missing: run `ms2rgb stage detector` (or `make run`) first")
    ctx = detector.worker_context(root, params, stage_dir, {"backbone_file": "backbone.pt"})
    ctx.out_dir = Path(tempfile.mkdtemp(prefix="detector-seeds-"))  # tuning checkpoints: never the stage's
    variants = {v.name: v for v in plan(params.detector, params.seed)}
    for name in args.variants.split(","):
        if name not in variants:
            raise SystemExit(f"variant {name!r} is not one of {sorted(variants)}; pick from those")
        score(ctx, variants[name])


def score(ctx: detector.Context, variant: Variant) -> None:
    """Print one variant's mIoU over its seeds, with its base and novel classes' mean IoU."""
    start, mious, base, novel = time.perf_counter(), [], [], []
    for seed in variant.seeds:
        run, _ = detector.score_seed(ctx, variant, seed)
        per_class = {name: iou for name, iou in run["per_class_iou"].items() if iou is not None}
        mious.append(run["miou"])
        base.append(statistics.mean(iou for name, iou in per_class.items() if name not in ctx.novel))
        novel.append(statistics.mean(iou for name, iou in per_class.items() if name in ctx.novel))
    spread = statistics.stdev(mious) if len(mious) > 1 else 0.0
    print(
        f"{variant.name}: mIoU {statistics.mean(mious):.3f} ± {spread:.3f} over {len(mious)} seeds "
        f"{[round(m, 3) for m in mious]}; base {statistics.mean(base):.3f}, novel {statistics.mean(novel):.3f} "
        f"({', '.join(ctx.novel)}); {time.perf_counter() - start:.0f} s",
        flush=True,
    )


if __name__ == "__main__":
    main()
