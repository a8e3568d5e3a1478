"""detector stage (method B): few-shot multimodal prompt tuning of a frozen CLIP into a class-map predictor.

Steps: get the backbone (configured weights, or the fallback pretrained on the captions
split; ``tasks/detector_pretrain.py``); then, each as a nested MLflow run with the same
seeds and budget, evaluate on ``seg_test``: zero-shot (hand-written template, no training),
the full method (coupled text + image prompts) at every K in ``shots``, and at the largest K
the ablations text-only (CoOp-like), visual-only (VPT-like) and independent prompts, each
over ``seeds`` seeds (mean and std reported; ``tasks/detector_report.py``). The full method
at the largest K and the params seed is saved to ``artifacts/detector/detector.pt`` (what
``ms2rgb detect`` loads) and registered as ``ms2rgb-detector``.

Classes are those of the segmentation source's legend (``data/prepared/legend.json``, index =
mask value; ``tasks/data/legend.py``): the surfaces for the synthetic masks, the weak-label
surfaces for scenes, the user's classes for a folder. Their descriptions are the class texts.
Tuned variants read the bare description after their learned prompts (CoOp's "[V]...[V]
description"); zero-shot reads ``zero_shot_template`` filled with it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ms2rgb.models.clip_detector import ClassMapDetector
from ms2rgb.models.clip_prompt import PromptedCLIP
from ms2rgb.tasks.config import DetectorConfig, Params
from ms2rgb.tasks.data.artifacts import resumable_staging_dir
from ms2rgb.tasks.data.atomic import write_atomic
from ms2rgb.tasks.data.cache import CachedSplit, open_split
from ms2rgb.tasks.data.legend import read_legend
from ms2rgb.tasks.data.validated import require_validated
from ms2rgb.tasks.detection.data import first_k_per_class, load_tiles
from ms2rgb.tasks.detection.model import DETECTOR_FILE, resolve_pretrained
from ms2rgb.tasks.detection.pretrain import SERVING, prepare_backbone
from ms2rgb.tasks.detection.report import BASELINES, FULL_MODE, aggregate, log_figures, summarise
from ms2rgb.tasks.detection.tune import evaluate, latest_checkpoint, tune
from ms2rgb.tasks.errors import ParamsError
from ms2rgb.tasks.tracking import StageTracker
from ms2rgb.tasks.tracking.pyfunc import LandCoverPyfunc, detector_artifacts
from ms2rgb.tasks.training.loop import fingerprint, pick_device, seed_everything

DETECTOR_MODEL = "ms2rgb-detector"
# split -> modalities; the detector alone reads the masks too (dvc.yaml lists exactly these files).
READS = {"captions": ("rgb",), "fewshot": ("rgb",), "seg_test": ("rgb",)}


@dataclass(frozen=True)
class Variant:
    """One compared setting: a prompt mode at K shots over some seeds."""

    name: str  # nested run and report key
    mode: str  # PromptConfig.mode
    shots: int  # K per scene class (0: no training)
    seeds: tuple[int, ...]  # tuning seeds (prompt init, batch order); the first is the params seed


def plan(shots: tuple[int, ...], seed: int, n_seeds: int) -> list[Variant]:
    """Zero-shot, the full method at every K, the ablations at the largest K.

    Only the comparison at the largest K gets ``n_seeds`` seeds (the 4-minute budget); zero-shot
    has nothing random to repeat and the smaller K of the full method get one.
    """
    k, many = max(shots), tuple(range(seed, seed + n_seeds))
    return (
        [Variant("zero_shot", "zero_shot", 0, (seed,))]
        + [Variant(f"full_k{s}", FULL_MODE, s, many if s == k else (seed,)) for s in sorted(set(shots))]
        + [Variant(name, mode, k, many) for name, mode in BASELINES.items()]
    )


@dataclass
class Context:
    """What every variant shares: data, frozen backbone, settings, output folder."""

    settings: DetectorConfig
    classes: dict[str, str]  # the masks' legend: name -> description, index = mask value
    clip: torch.nn.Module
    tokenizer: Any
    fewshot: CachedSplit
    test_images: torch.Tensor
    test_masks: torch.Tensor
    out_dir: Path
    device: torch.device


def build_detector(ctx: Context, mode: str, seed: int) -> ClassMapDetector:
    """A fresh, seeded PromptedCLIP around the shared frozen CLIP, with the legend's texts baked in."""
    seed_everything(seed)  # same prompt init for every variant of a mode at this seed
    prompt = ctx.settings.prompt
    cfg = prompt.model(mode)
    descriptions = list(ctx.classes.values())
    texts = [ctx.settings.zero_shot_template.format(d) for d in descriptions] if mode == "zero_shot" else descriptions
    try:
        prompted = PromptedCLIP(ctx.clip, cfg)
    except ValueError as err:  # e.g. depth or a similarity layer beyond this CLIP's layers
        raise ParamsError("detector.prompt", prompt.model_dump(), str(err)) from err
    return ClassMapDetector(prompted, ctx.tokenizer(texts), list(ctx.classes), texts, ctx.settings.clip.model)


def _step_printer(label: str, max_steps: int) -> Callable[[int, float], None]:
    def on_step(step: int, loss: float) -> None:
        if step % 20 == 0 or step == 1:
            print(f"detector: {label} step {step}/{max_steps} loss {loss:.3f}", flush=True)

    return on_step


def score_seed(
    ctx: Context, variant: Variant, seed: int, child: StageTracker
) -> tuple[dict[str, Any], ClassMapDetector]:
    """Tune one seed of a variant (unless zero-shot) and score it on seg_test."""
    detector = build_detector(ctx, variant.mode, seed)
    run: dict[str, Any] = {"seed": seed}
    if variant.mode != "zero_shot":
        label = f"{variant.name} seed {seed}"
        images, masks = load_tiles(ctx.fewshot, first_k_per_class(ctx.fewshot, variant.shots))
        checkpoints = ctx.out_dir / "checkpoints" / variant.name / f"seed{seed}"
        result = tune(
            detector,
            images,
            masks,
            ctx.settings.tune,
            seed,
            ctx.device,
            checkpoint_dir=checkpoints,
            resume_from=latest_checkpoint(checkpoints),
            on_step=_step_printer(label, ctx.settings.tune.max_steps),
        )
        child.log_metric_series(f"train_loss_seed{seed}", result.losses)
        run.update(
            losses=result.losses, stopped_by=result.stopped_by, steps=len(result.losses), train_seconds=result.seconds
        )
        print(
            f"detector: {label} stopped by {result.stopped_by} after {len(result.losses)} steps "
            f"({result.seconds:.1f}s)",
            flush=True,
        )
    scores, preds = evaluate(detector, ctx.test_images, ctx.test_masks, ctx.device, ctx.settings.eval_batch_size)
    run.update(scores, preds=preds)
    return run, detector


def run_variant(ctx: Context, variant: Variant, tracker: StageTracker) -> tuple[dict[str, Any], ClassMapDetector]:
    """Every seed of one variant in its own nested run; returns the aggregate and the first seed's model."""
    with tracker.child(variant.name, tags={"ms2rgb.variant": variant.name}) as child:
        child.log_params({"mode": variant.mode, "shots": variant.shots, "seeds": list(variant.seeds)})
        runs, models = [], []
        for i, seed in enumerate(variant.seeds):
            run, model = score_seed(ctx, variant, seed, child)
            runs.append(run)
            models.append(model if i == 0 else None)  # only the params seed's prompts are kept
            child.log_metrics({"miou_by_seed": run["miou"]}, step=seed)
        kept = models[0]
        assert kept is not None, "the first seed's model is kept (a variant has at least one seed)"
        result = aggregate(variant.mode, variant.shots, runs, kept.prompted.num_trainable)
        child.log_params({"texts": "; ".join(kept.texts)})
        child.log_metrics(
            {k: result[k] for k in ("miou", "miou_std", "pixel_accuracy", "tiles_per_second", "trainable_params")}
        )
        child.log_json({k: v for k, v in result.items() if k not in ("preds", "losses")}, "variant.json")
    print(
        f"detector: {variant.name}: mIoU {result['miou']:.3f} ± {result['miou_std']:.3f} over "
        f"{len(runs)} seed(s), pixel accuracy {result['pixel_accuracy']:.3f}",
        flush=True,
    )
    return result, kept


def save_detector(ctx: Context, detector: ClassMapDetector, info: dict[str, Any]) -> Path:
    """artifacts/detector/detector.pt: what `ms2rgb detect` needs besides the backbone weights."""
    payload = {
        "clip_model": ctx.settings.clip.model,
        # The fallback's weights live beside this file; other weights are found where params said.
        "clip_pretrained": info.get("backbone_file", ctx.settings.clip.pretrained),
        "pretrained_in_artifacts": "backbone_file" in info,
        "weights": info["weights"],
        "prompt_config": dataclasses.asdict(detector.prompted.cfg),
        "prompt_state": detector.prompted.prompt_state_dict(),
        "class_names": detector.class_names,
        "texts": detector.texts,
    }
    return write_atomic(ctx.out_dir / DETECTOR_FILE, lambda tmp: torch.save(payload, tmp))


def run(root: Path, params: Params, tracker: StageTracker) -> dict[str, Any]:
    """Stage entry point (DVC and Prefect call this alike)."""
    start = time.perf_counter()
    settings, seed, device = params.detector, params.seed, pick_device()
    prepared = root / params.data.prepared_dir
    data_digest = require_validated(root, prepared, READS)
    classes = read_legend(prepared)
    tracker.log_params(
        {"detector": settings.model_dump(), "seed": seed, "device": str(device), "classes": list(classes)}
    )
    # Swapped in whole by the stage runner after success; what a killed run of these params and
    # data left here (backbone, tuning checkpoints) is picked up again.
    identity = fingerprint(settings.model_dump(), data_digest, seed, classes)
    out_dir = resumable_staging_dir(root, "detector", identity)
    clip_cfg = settings.clip.model_copy(update={"pretrained": resolve_pretrained(root, settings.clip.pretrained)})
    clip, tokenizer, info = prepare_backbone(
        clip_cfg,
        settings.pretrain,
        lambda: open_split(prepared, "captions", "rgb", masks=True),
        out_dir,
        seed,
        device,
        tracker,
        classes,
    )
    test_images, test_masks = load_tiles(open_split(prepared, "seg_test", "rgb", masks=True))
    ctx = Context(
        settings,
        classes,
        clip,
        tokenizer,
        open_split(prepared, "fewshot", "rgb", masks=True),
        test_images,
        test_masks,
        out_dir,
        device,
    )
    shots = settings.shots
    results, models = {}, {}
    for variant in plan(shots, seed, settings.seeds):
        results[variant.name], models[variant.name] = run_variant(ctx, variant, tracker)
    head = models[f"full_k{max(shots)}"]
    save_detector(ctx, head, info)
    test_tiles = (test_images, test_masks)
    log_figures(results, shots, settings.tune.loss_threshold, test_tiles, settings.examples, tracker, list(classes))
    report = summarise(results, shots, info)
    example = test_images[:1].numpy().astype(np.float32)  # serving input: RGB 0..255, any multiple of 8
    version = tracker.log_pyfunc_model(  # weights as detector.pt (+ backbone.pt) artifacts; serves class ids
        LandCoverPyfunc(),
        detector_artifacts(ctx.out_dir / DETECTOR_FILE, root),
        example,
        DETECTOR_MODEL,
        any_size=True,
        metadata={"class_names": list(head.class_names)},
        extra_requirements=SERVING["extra_requirements"],
    )
    report.update(registered_model=f"{DETECTOR_MODEL}/{version}", stage_seconds=round(time.perf_counter() - start, 1))
    return report
