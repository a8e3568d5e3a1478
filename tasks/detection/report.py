"""The detector stage's numbers and figures: per-variant aggregation over seeds, reports/detector.json, plots.

A variant's seeds share the backbone and the data; they differ in prompt initialisation and
batch order. Its first seed (the params ``seed``) is the one whose prompts are saved, whose
loss curve and example tiles are drawn and whose stop reason is reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ms2rgb.tasks.data.classes import SURFACE_NAMES
from ms2rgb.tasks.detection import plots
from ms2rgb.tasks.tracking import StageTracker

FULL_MODE = "coupled"
BASELINES = {"text_prompts": "text", "visual_prompts": "visual", "independent": "independent"}
GOAL_POINTS = 20.0  # issue 5: the full method at the largest K beats zero-shot by this many mIoU points


def _mean(runs: Sequence[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return float(np.mean(values)) if values else None


def aggregate(mode: str, shots: int, runs: list[dict[str, Any]], trainable_params: int) -> dict[str, Any]:
    """Mean (and sample std) over a variant's seed runs, plus the first run's curve, maps and stop reason."""
    mious = [r["miou"] for r in runs]
    per_class = {
        name: round(float(np.mean([r["per_class_iou"][name] for r in runs])), 4)
        for name in runs[0]["per_class_iou"]
        if all(name in r["per_class_iou"] for r in runs)
    }
    first = runs[0]
    return {
        "mode": mode,
        "shots": shots,
        "seeds": len(runs),
        "trainable_params": trainable_params,
        "miou": float(np.mean(mious)),
        "miou_std": float(np.std(mious, ddof=1)) if len(runs) > 1 else 0.0,
        "pixel_accuracy": _mean(runs, "pixel_accuracy"),
        "per_class_iou": per_class,
        "tiles_per_second": _mean(runs, "tiles_per_second"),
        "train_seconds": _mean(runs, "train_seconds"),
        "stopped_by": first.get("stopped_by"),
        "steps": first.get("steps"),
        "losses": first.get("losses", []),
        "preds": first["preds"],
        "runs": [{k: r.get(k) for k in ("seed", "miou", "pixel_accuracy", "stopped_by", "steps")} for r in runs],
    }


def _brief(result: dict[str, Any]) -> dict[str, Any]:
    """What reports/detector.json keeps of a variant (no curves, no maps)."""
    return {
        "miou": round(result["miou"], 4),
        "miou_std": round(result["miou_std"], 4),
        "pixel_accuracy": round(result["pixel_accuracy"], 4),
        "seeds": result["seeds"],
        "trainable_params": result["trainable_params"],
        "stopped_by": result["stopped_by"],
        "steps": result["steps"],
        "per_class_iou": result["per_class_iou"],
        "runs": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in result["runs"]],
    }


def summarise(results: dict[str, dict[str, Any]], shots: Sequence[int], info: dict[str, Any]) -> dict[str, Any]:
    """reports/detector.json: the headline (full method, largest K), every K, the baselines, the goal."""
    head = results[f"full_k{max(shots)}"]
    baselines = {name: round(results[name]["miou"], 4) for name in ("zero_shot", *BASELINES)}
    over_zero_shot = round(100 * (head["miou"] - baselines["zero_shot"]), 1)
    beats_all = all(head["miou"] >= v for v in baselines.values())
    return {
        "weights": info["weights"],
        "clip_model": info["clip_model"],
        "shots": max(shots),
        "seeds": head["seeds"],
        "miou": round(head["miou"], 4),
        "miou_std": round(head["miou_std"], 4),
        "pixel_accuracy": round(head["pixel_accuracy"], 4),
        "per_class_iou": head["per_class_iou"],
        "trainable_params": head["trainable_params"],
        "train_seconds": round(head["train_seconds"], 2),
        "tiles_per_second": round(head["tiles_per_second"], 1),
        "stopped_by": head["stopped_by"],
        "steps": head["steps"],
        "by_shots": {str(r["shots"]): _brief(r) for r in results.values() if r["mode"] == FULL_MODE},
        "baselines": baselines,
        "baseline_details": {name: _brief(results[name]) for name in baselines},
        "goal": {
            "beats_every_baseline": beats_all,
            "points_over_zero_shot": over_zero_shot,
            "met": beats_all and over_zero_shot >= GOAL_POINTS,
        },
        "pretrain_seconds": info.get("pretrain_seconds", 0.0),
    }


def log_figures(
    results: dict[str, dict[str, Any]],
    shots: Sequence[int],
    threshold: float,
    test_tiles: tuple[torch.Tensor, torch.Tensor],
    examples: int,
    tracker: StageTracker,
    class_names: Sequence[str] = SURFACE_NAMES,
) -> None:
    """Loss curves, mIoU vs K, per-class IoU bars and example tiles of the headline model.
    `class_names`: the legend of the masks (index = mask value)."""
    k = max(shots)
    images, masks = test_tiles
    rows = np.unique(np.linspace(0, len(images) - 1, min(examples, len(images))).astype(int))
    figures = {
        "loss_curves.png": plots.loss_curves({n: r["losses"] for n, r in results.items() if r["losses"]}, threshold),
        "miou_vs_k.png": plots.miou_vs_shots(
            {r["shots"]: r["miou"] for r in results.values() if r["mode"] == FULL_MODE},
            {n: results[n]["miou"] for n in ("zero_shot", *BASELINES)},
        ),
        "per_class_iou.png": plots.per_class_bars(
            {n: results[n]["per_class_iou"] for n in (f"full_k{k}", "zero_shot", *BASELINES)}, list(class_names)
        ),
        "examples.png": plots.example_tiles(
            images[rows].numpy(), masks[rows].numpy(), results[f"full_k{k}"]["preds"][rows], list(class_names)
        ),
    }
    for name, figure in figures.items():
        tracker.log_figure(figure, f"figures/{name}")
