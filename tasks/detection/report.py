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
from ms2rgb.tasks.detection.plan import (
    ABLATIONS,
    CLIP_BASELINES,
    OPEN_VOCABULARY,
    PIXEL_BASELINES,
    PURE_METHOD,
    Variant,
)
from ms2rgb.tasks.detection.tune import STOP_THRESHOLD
from ms2rgb.tasks.tracking import StageTracker
from ms2rgb.tasks.training.metrics import miou_interval

BOOTSTRAP = 1000  # tile resamples of each variant's 95 % interval (seeded: the same on every rerun)
COMPARED = ("zero_shot", PURE_METHOD, *ABLATIONS, *CLIP_BASELINES, *PIXEL_BASELINES)  # what the headline is set against
USER_ALTERNATIVES = PIXEL_BASELINES  # what a user would train instead of prompting a CLIP
GOAL_POINTS = 20.0  # issue 5: the full method at the largest K beats zero-shot by this many mIoU points


def _mean(runs: Sequence[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return float(np.mean(values)) if values else None


def class_group_miou(per_class: dict[str, float], names: Sequence[str]) -> float | None:
    """Mean IoU over the named classes that were scored (None when none was)."""
    values = [per_class[n] for n in names if n in per_class]
    return float(np.mean(values)) if values else None


def open_vocabulary(per_class: dict[str, float], novel: Sequence[str]) -> dict[str, float | None]:
    """Base / novel mIoU and their harmonic mean (MaPLe's HM, per pixel) from per-class IoU."""
    base = class_group_miou(per_class, [n for n in per_class if n not in novel])
    new = class_group_miou(per_class, novel)
    hm = 2 * base * new / (base + new) if base is not None and new is not None and base + new > 0 else None
    return {"base_miou": base, "novel_miou": new, "hm": hm}


def aggregate(variant: Variant, runs: list[dict[str, Any]], max_steps: int, novel: Sequence[str]) -> dict[str, Any]:
    """Mean, sample std and tile-bootstrap 95 % interval over a variant's seeds, its cost, base/novel
    split, and the first run's curve, maps and stop reason."""
    mious = [r["miou"] for r in runs]
    per_class = {
        name: round(float(np.mean([r["per_class_iou"][name] for r in runs])), 4)
        for name in runs[0]["per_class_iou"]
        if all(name in r["per_class_iou"] for r in runs)
    }
    low, high = miou_interval([r["tile_conf"] for r in runs], BOOTSTRAP, seed=0)
    first = runs[0]
    stopped_early = [r for r in runs if r.get("stopped_by") == STOP_THRESHOLD]
    return {
        "kind": variant.kind,
        "mode": variant.mode,
        "shots": variant.shots,
        "seeds": len(runs),
        "trainable_params": first["trainable_params"],
        "miou": float(np.mean(mious)),
        "miou_std": float(np.std(mious, ddof=1)) if len(runs) > 1 else 0.0,
        "miou_ci95": [round(low, 4), round(high, 4)],
        "pixel_accuracy": _mean(runs, "pixel_accuracy"),
        "per_class_iou": per_class,
        **open_vocabulary(per_class, novel),
        "tiles_per_second": _mean(runs, "tiles_per_second"),
        "train_seconds": _mean(runs, "train_seconds"),
        "peak_memory_mb": _mean(runs, "peak_memory_mb"),
        "stopped_by": first.get("stopped_by"),
        "steps": first.get("steps"),
        "evidence_weight": _mean(runs, "evidence_weight"),  # tuned weight of the pixel evidence; None: without
        "stopped_by_threshold": len(stopped_early),
        "steps_saved": sum(max_steps - r["steps"] for r in stopped_early),
        "losses": first.get("losses", []),
        "preds": first["preds"],
        "runs": [{k: r.get(k) for k in ("seed", "miou", "pixel_accuracy", "stopped_by", "steps")} for r in runs],
    }


def _rounded(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) else value


def _brief(result: dict[str, Any]) -> dict[str, Any]:
    """What reports/detector.json keeps of a variant (no curves, no maps)."""
    keys = (
        "kind", "miou", "miou_std", "miou_ci95", "pixel_accuracy", "seeds", "trainable_params", "train_seconds",
        "peak_memory_mb", "tiles_per_second", "stopped_by", "steps", "per_class_iou", "base_miou", "novel_miou", "hm",
        "evidence_weight",
    )  # fmt: skip
    brief = {k: _rounded(result.get(k)) for k in keys}
    brief["runs"] = [{k: _rounded(v) for k, v in r.items()} for r in result["runs"]]
    return brief


def _stops(results: dict[str, dict[str, Any]]) -> dict[str, int]:
    """How often the loss-threshold rule ended a tuning run, and the optimiser steps it saved."""
    tuned = [r for r in results.values() if r["kind"] not in PIXEL_BASELINES and r["shots"]]
    return {
        "tuning_runs": sum(r["seeds"] for r in tuned),
        "stopped_by_threshold": sum(r["stopped_by_threshold"] for r in tuned),
        "steps_saved": sum(r["steps_saved"] for r in tuned),
    }


def _goal(head: dict[str, Any], results: dict[str, dict[str, Any]], baselines: dict[str, float]) -> dict[str, Any]:
    """Whether the headline beats each compared variant, zero-shot by GOAL_POINTS, and what a user would pick."""
    beats = {name: head["miou"] >= results[name]["miou"] for name in baselines}
    over_zero_shot = round(100 * (head["miou"] - results["zero_shot"]["miou"]), 1)
    return {
        "beats": beats,
        "beats_every_baseline": all(beats.values()),
        "beats_user_alternatives": all(beats[name] for name in USER_ALTERNATIVES if name in beats),
        "points_over_zero_shot": over_zero_shot,
        "met": all(beats.values()) and over_zero_shot >= GOAL_POINTS,
    }


def _full_by_shots(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The full method's result at each K (its variants are named full_k<K>)."""
    return {str(r["shots"]): r for name, r in results.items() if name.startswith("full_k")}


def summarise(
    results: dict[str, dict[str, Any]], shots: Sequence[int], info: dict[str, Any], novel: Sequence[str]
) -> dict[str, Any]:
    """reports/detector.json: the headline (full method, largest K), every K, what it is compared with,
    open vocabulary, the stop rule's count, and whether it beats what a user would pick instead."""
    head = results[f"full_k{max(shots)}"]
    baselines = {name: round(results[name]["miou"], 4) for name in COMPARED if name in results}
    return {
        "weights": info["weights"],
        "clip_model": info["clip_model"],
        "shots": max(shots),
        **{k: v for k, v in _brief(head).items() if k not in ("kind", "runs")},
        "by_shots": {shots: _brief(r) for shots, r in _full_by_shots(results).items()},
        "baselines": baselines,
        "baseline_details": {name: _brief(results[name]) for name in baselines},
        "open_vocabulary": {
            "novel_classes": list(novel),
            **{
                name: {k: _rounded(v) for k, v in open_vocabulary(results[name]["per_class_iou"], novel).items()}
                for name in ("zero_shot", f"full_k{max(shots)}", OPEN_VOCABULARY)
                if name in results
            },
        },
        "loss_threshold_stops": _stops(results),
        "goal": _goal(head, results, baselines),
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
            {int(s): r["miou"] for s, r in _full_by_shots(results).items()},
            {n: results[n]["miou"] for n in COMPARED if n in results},
        ),
        "per_class_iou.png": plots.per_class_bars(
            {n: results[n]["per_class_iou"] for n in (f"full_k{k}", *COMPARED) if n in results}, list(class_names)
        ),
        "examples.png": plots.example_tiles(
            images[rows].numpy(), masks[rows].numpy(), results[f"full_k{k}"]["preds"][rows], list(class_names)
        ),
    }
    for name, figure in figures.items():
        tracker.log_figure(figure, f"figures/{name}")
