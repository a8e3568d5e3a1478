"""Method B against its CLIP baselines on the prepared splits: mIoU, train seconds, tiles/s, parameters, memory.

Variants (each tuned with params.yaml `detector.tune` on the K-shot `fewshot` tiles, scored on `seg_test`):
`coupled` (the method), `meta_net` (CoCoOp-style, prompts of mode independent + meta-network),
`meta_net_text` (CoCoOp-style, deep text prompts only + meta-network) and `linear_probe`
(one Linear(D, K) per similarity layer). Each (variant, seed) runs in a fresh process so that
the peak resident memory of its tuning (tasks/training/memory.py) starts from the same ground.
Usage: python bench/clip_baselines.py --backbone FILE [--root .] [--seeds 2] [--only NAME ...] [--tune KEY=VALUE ...]
`--backbone`: a state dict of `detector.clip.model`, e.g. artifacts/detector/backbone.pt of a run.
`--tune`: overrides of `detector.tune` (YAML values), e.g. `--tune lr=0.1 --tune max_steps=300`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from ms2rgb.models.clip_backbone import load_clip
from ms2rgb.models.clip_detector import ClassMapDetector
from ms2rgb.models.clip_linear_probe import LinearProbeCLIP
from ms2rgb.models.clip_meta_prompt import MetaPromptedCLIP
from ms2rgb.models.clip_prompt import PromptedCLIP
from ms2rgb.tasks.config import load_params
from ms2rgb.tasks.data.cache import open_split
from ms2rgb.tasks.data.legend import read_legend
from ms2rgb.tasks.detection.data import first_k_per_class, load_tiles
from ms2rgb.tasks.detection.tune import evaluate, tune
from ms2rgb.tasks.training.loop import make_deterministic, seed_everything
from ms2rgb.tasks.training.memory import PeakMemory

CPU = torch.device("cpu")
VARIANTS = ("coupled", "meta_net", "meta_net_text", "linear_probe")


def build(name: str, clip: torch.nn.Module, settings: Any, n_classes: int) -> PromptedCLIP:
    if name == "coupled":
        return PromptedCLIP(clip, settings.prompt.model("coupled"))
    if name == "meta_net":
        return MetaPromptedCLIP(clip, settings.prompt.model("independent"))
    if name == "meta_net_text":
        return MetaPromptedCLIP(clip, settings.prompt.model("text"))
    return LinearProbeCLIP(clip, settings.prompt.model("zero_shot"), n_classes)


def one(root: Path, backbone: str, name: str, seed: int, overrides: list[str]) -> dict[str, Any]:
    """Tune and score one variant at one seed in this process."""
    params = load_params(root)
    make_deterministic(params.threads)
    settings = params.detector
    raw = {**settings.tune.model_dump(), **{k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in overrides)}}
    settings = settings.model_copy(update={"tune": type(settings.tune).model_validate(raw, strict=False)})
    prepared = root / params.data.prepared_dir
    classes = read_legend(prepared)
    fewshot = open_split(prepared, "fewshot", "rgb", masks=True)
    k = max(settings.shots)
    images, masks = load_tiles(fewshot, first_k_per_class(fewshot, k))
    test_images, test_masks = load_tiles(open_split(prepared, "seg_test", "rgb", masks=True))
    clip, tokenizer, _ = load_clip(settings.clip.model, backbone)
    seed_everything(seed)
    prompted = build(name, clip, settings, len(classes))
    texts = list(classes.values())
    detector = ClassMapDetector(prompted, tokenizer(texts), list(classes), texts, settings.clip.model)
    with PeakMemory(CPU) as memory:
        result = tune(detector, images, masks, settings.tune, seed, CPU)
    scores, _ = evaluate(detector, test_images, test_masks, CPU, settings.eval_batch_size)
    return {
        "variant": name,
        "seed": seed,
        "shots": k,
        "shot_tiles": len(images),
        "tune": settings.tune.model_dump(),
        **scores,
        "trainable_params": prompted.num_trainable,
        "train_seconds": round(result.seconds, 2),
        "steps": len(result.losses),
        "stopped_by": result.stopped_by,
        "final_loss": round(float(np.mean(result.losses[-5:])), 4),
        "peak_memory_mb": None if memory.mb is None else round(memory.mb, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("."))
    parser.add_argument("--backbone", required=True)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--only", choices=VARIANTS, action="append")
    parser.add_argument("--tune", dest="overrides", action="append", default=[])
    parser.add_argument("--one", nargs=2, metavar=("VARIANT", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.root, args.backbone, args.one[0], int(args.one[1]), args.overrides)))
        return
    first = load_params(args.root).seed
    rows = []
    for name in args.only or VARIANTS:
        for seed in range(first, first + args.seeds):
            cmd = [sys.executable, __file__, "--root", str(args.root), "--backbone", args.backbone]
            cmd += [f"--tune={o}" for o in args.overrides]
            out = subprocess.run([*cmd, "--one", name, str(seed)], check=True, capture_output=True, text=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(json.dumps(row), flush=True)
    for name in args.only or VARIANTS:
        mine = [r for r in rows if r["variant"] == name]
        mious = [r["miou"] for r in mine]
        print(
            f"{name:14s} mIoU {np.mean(mious):.4f} ± {np.std(mious, ddof=1) if len(mious) > 1 else 0:.4f}  "
            f"train {np.mean([r['train_seconds'] for r in mine]):.1f} s  "
            f"{np.mean([r['tiles_per_second'] for r in mine]):.0f} tiles/s  params {mine[0]['trainable_params']}  "
            f"peak {np.mean([r['peak_memory_mb'] or np.nan for r in mine]):.0f} MB",
            flush=True,
        )


if __name__ == "__main__":
    main()
