"""Wall time and peak memory of the whole detector stage (fallback pretraining included).

Runs `flows.stages.run_stage("detector", root)` on the project's prepared data exactly as
`ms2rgb stage detector` would (MLflow logging and registration included), then prints the
seconds of each part from the report and the process's peak resident memory.
Usage: python bench/detector.py [--root .] [--threads N]
Needs a prepared, validated project (`ms2rgb stage prepare` then `ms2rgb stage validate`, or
`make run`). On a shared machine the figure includes whatever else competes for the cores: say so
when quoting it.
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch

from ms2rgb.flows.stages import run_stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=".")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    report = run_stage("detector", Path(args.root).resolve())
    seconds = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    device = "cuda" if torch.cuda.is_available() else f"cpu x{torch.get_num_threads()} threads"
    print(f"\ndetector stage: {seconds:.1f} s wall on {device}, peak RSS {peak_mib:.0f} MiB")
    print(f"  fallback pretraining: {report['pretrain_seconds']:.1f} s")
    print(
        f"  headline tuning (full method, K={report['shots']}): {report['train_seconds']:.1f} s, "
        f"inference {report['tiles_per_second']:.0f} tiles/s"
    )
    print(
        f"  mIoU {report['miou']:.3f} (zero-shot {report['baselines']['zero_shot']:.3f}); weights: {report['weights']}"
    )


if __name__ == "__main__":
    main()
