"""detector stage (method B): few-shot multimodal prompt tuning of a frozen CLIP into a class-map predictor.

Steps: get the backbone (configured weights, or the fallback pretrained on the captions split,
reused while its inputs stay the same; ``tasks/detection/pretrain.py``); then, each as a nested
MLflow run with the same seeds and budget, score on ``seg_test`` what ``tasks/detection/plan.py``
lists: zero-shot, the full method (coupled text + image prompts) at every K in ``shots``, and at the
largest K its ablations, base-to-novel, and the baselines a user would try instead (linear probe,
CoCoOp-style meta-network, per-pixel random forest, U-Net), each over ``seeds`` seeds (mean, std,
95 % interval; ``tasks/detection/report.py``). Each (variant, seed) is one call that params'
``compute`` runner places: in this process by default, else on worker processes or a Dask cluster,
with the same numbers; the stage's own process logs every result. The full method at the largest K
and the params seed is saved to ``artifacts/detector/detector.pt`` (what ``ms2rgb detect`` loads)
and registered as ``<tracking.model_prefix>-detector``.

Classes are those of the segmentation source's legend (``data/prepared/legend.json``, index =
mask value; ``tasks/data/legend.py``): the surfaces for the synthetic masks, the weak-label
surfaces for scenes, the user's classes for a folder. Their descriptions are the class texts.
Tuned variants read the bare description after their learned prompts (CoOp's "[V]...[V]
description"); zero-shot reads ``zero_shot_template`` filled with it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ms2rgb.models.clip_backbone import freeze, load_clip
from ms2rgb.models.clip_detector import ClassMapDetector
from ms2rgb.models.clip_linear_probe import LinearProbeCLIP
from ms2rgb.models.clip_meta_prompt import MetaPromptedCLIP
from ms2rgb.models.clip_prompt import PromptedCLIP
from ms2rgb.models.pixel_evidence import PixelEvidence
from ms2rgb.tasks.config import DetectorConfig, Params, model_name
from ms2rgb.tasks.data.artifacts import resumable_staging_dir, staging_dir
from ms2rgb.tasks.data.atomic import write_atomic
from ms2rgb.tasks.data.cache import CachedSplit, open_split
from ms2rgb.tasks.data.classes import MASK_NODATA
from ms2rgb.tasks.data.geotiff import PIXEL_SIZE
from ms2rgb.tasks.data.legend import read_legend
from ms2rgb.tasks.data.manifest import FOLDER_SOURCE_PREFIX
from ms2rgb.tasks.data.validated import require_validated
from ms2rgb.tasks.detection.baselines import fit_pixel_expert, run_baseline
from ms2rgb.tasks.detection.data import first_k_per_class, load_tiles
from ms2rgb.tasks.detection.evidence_weight import AUTO_FALLBACK_WEIGHT, cross_fitted_weight
from ms2rgb.tasks.detection.model import DETECTOR_FILE, OUT_DIR, evidence_payload, resolve_pretrained
from ms2rgb.tasks.detection.plan import PIXEL_BASELINES, Variant, novel_classes, plan
from ms2rgb.tasks.detection.pretrain import SERVING, prepare_backbone
from ms2rgb.tasks.detection.report import aggregate, log_figures, summarise
from ms2rgb.tasks.detection.tune import evaluate, latest_checkpoint, tune
from ms2rgb.tasks.errors import ParamsError
from ms2rgb.tasks.tracking import StageTracker
from ms2rgb.tasks.tracking.pyfunc import LandCoverPyfunc, detector_artifacts
from ms2rgb.tasks.training import distributed
from ms2rgb.tasks.training.loop import fingerprint, pick_device, seed_everything
from ms2rgb.tasks.training.memory import PeakMemory
from ms2rgb.tasks.training.metrics import tile_confusions
from ms2rgb.tasks.training.parallel import ProcessLocal, run_all

# split -> modalities; the detector alone reads the masks too (dvc.yaml lists exactly these files).
READS = {"captions": ("rgb",), "fewshot": ("rgb",), "seg_test": ("rgb",)}


@dataclass
class Context:
    """What every variant shares: data, frozen backbone, settings, output folder."""

    settings: DetectorConfig
    classes: dict[str, str]  # the masks' legend: name -> description, index = mask value
    novel: list[str]  # classes unlabelled while tuning base_to_novel
    clip: torch.nn.Module
    tokenizer: Any
    fewshot: CachedSplit
    test_images: torch.Tensor
    test_masks: torch.Tensor
    out_dir: Path
    device: torch.device
    threads: int  # a cell's CPU threads (compute.cell_threads): the forest's jobs
    # (seed, shots) -> fitted pixel evidence: the variants of one seed and K share one fit (the MLP's ~5 s)
    evidence_fits: dict[tuple[int, bytes], PixelEvidence] = field(default_factory=dict)


def pixel_evidence(
    ctx: Context, variant: Variant, shots: tuple[torch.Tensor, torch.Tensor], seed: int
) -> PixelEvidence | None:
    """The pixel evidence fitted on the variant's shots (frozen), or None where it goes without it."""
    if ctx.settings.pixel_evidence is None or not variant.pixel_evidence or not variant.shots:
        return None
    return fitted_evidence(ctx, *shots, seed)


def fitted_evidence(ctx: Context, images: torch.Tensor, masks: torch.Tensor, seed: int) -> PixelEvidence:
    """The configured expert fitted on these tiles with this seed, fitted once per stage run."""
    cfg = ctx.settings.pixel_evidence
    assert cfg is not None  # callers check
    key = (seed, hashlib.sha1(images.numpy().tobytes() + masks.numpy().tobytes()).digest())
    if key not in ctx.evidence_fits:
        ctx.evidence_fits[key] = fit_pixel_expert(cfg, cfg.model, len(ctx.classes), images, masks, seed)
    return ctx.evidence_fits[key]


def start_evidence_weight(
    ctx: Context, detector: ClassMapDetector, shots: tuple[torch.Tensor, torch.Tensor], seed: int
) -> None:
    """Set the evidence weight tuning starts from: params' number, or with ``auto`` the one that
    cross-fitting on the shots picks (tasks/detection/evidence_weight.py). ``seed`` seeds the
    folds' experts: the variant's first, so every seed of one K starts from the same weight and the
    fold fits (two of the MLP's ~6 s each) are made once per K, not once per seed."""
    cfg = ctx.settings.pixel_evidence
    if cfg is None or detector.evidence is None or detector.evidence_weight is None or cfg.init_weight != "auto":
        return
    weight = cross_fitted_weight(
        detector,
        lambda images, masks: fitted_evidence(ctx, images, masks, seed),
        *shots,
        batch_size=ctx.settings.eval_batch_size,
        fallback=AUTO_FALLBACK_WEIGHT,
        device=ctx.device,
    )
    with torch.no_grad():
        detector.evidence_weight.fill_(weight)
    print(f"detector: evidence weight {weight} cross-fitted on the shots (fold experts seeded {seed})", flush=True)


def build_detector(
    ctx: Context, variant: Variant, seed: int, shots: tuple[torch.Tensor, torch.Tensor] | None = None
) -> ClassMapDetector:
    """A fresh, seeded model around the shared frozen CLIP, with the legend's texts baked in (and the
    pixel evidence of `shots` where the variant uses it)."""
    seed_everything(seed)  # same prompt init for every variant of a mode at this seed
    prompt = ctx.settings.prompt
    descriptions = list(ctx.classes.values())
    zero_shot = variant.mode == "zero_shot"
    texts = [ctx.settings.zero_shot_template.format(d) for d in descriptions] if zero_shot else descriptions
    try:
        if variant.kind == "linear_probe":
            prompted: PromptedCLIP = LinearProbeCLIP(ctx.clip, prompt.model("zero_shot"), len(ctx.classes))
        elif variant.kind == "meta_net":
            prompted = MetaPromptedCLIP(ctx.clip, prompt.model(variant.mode))
        else:
            prompted = PromptedCLIP(ctx.clip, prompt.model(variant.mode))
    except ValueError as err:  # e.g. depth or a similarity layer beyond this CLIP's layers
        raise ParamsError("detector.prompt", prompt.model_dump(), str(err)) from err
    evidence = pixel_evidence(ctx, variant, shots, seed) if shots is not None else None
    configured = ctx.settings.pixel_evidence.init_weight if ctx.settings.pixel_evidence else 0.0
    detector = ClassMapDetector(
        prompted,
        ctx.tokenizer(texts),
        list(ctx.classes),
        texts,
        ctx.settings.clip.model,
        evidence=evidence,
        evidence_weight=AUTO_FALLBACK_WEIGHT if configured == "auto" else configured,
    )
    if shots is not None:
        start_evidence_weight(ctx, detector, shots, variant.seeds[0])
    return detector


def _step_printer(label: str, max_steps: int) -> Callable[[int, float], None]:
    def on_step(step: int, loss: float) -> None:
        if step % 20 == 0 or step == 1:
            print(f"detector: {label} step {step}/{max_steps} loss {loss:.3f}", flush=True)

    return on_step


def shot_tiles(ctx: Context, variant: Variant) -> tuple[torch.Tensor, torch.Tensor]:
    """The K-shot tiles and masks a variant learns from; novel classes unlabelled where it hides them."""
    images, masks = load_tiles(ctx.fewshot, first_k_per_class(ctx.fewshot, variant.shots))
    if variant.hide_novel:
        novel = torch.tensor([list(ctx.classes).index(name) for name in ctx.novel], dtype=masks.dtype)
        masks = torch.where(torch.isin(masks, novel), torch.full_like(masks, MASK_NODATA), masks)
    return images, masks


def tune_and_score(ctx: Context, variant: Variant, seed: int) -> tuple[dict[str, Any], ClassMapDetector]:
    """Tune one seed of a CLIP-based variant (unless zero-shot) and score it on seg_test."""
    shots = shot_tiles(ctx, variant) if variant.shots else None
    detector = build_detector(ctx, variant, seed, shots)
    run: dict[str, Any] = {"seed": seed}
    if shots is not None:
        label = f"{variant.name} seed {seed}"
        checkpoints = ctx.out_dir / "checkpoints" / variant.name / f"seed{seed}"
        with PeakMemory(ctx.device) as memory:
            result = tune(
                detector,
                *shots,
                ctx.settings.tune,
                seed,
                ctx.device,
                checkpoint_dir=checkpoints,
                resume_from=latest_checkpoint(checkpoints),
                on_step=_step_printer(label, ctx.settings.tune.max_steps),
            )
        run.update(
            losses=result.losses,
            stopped_by=result.stopped_by,
            steps=len(result.losses),
            train_seconds=result.seconds,
            peak_memory_mb=memory.mb,
        )
        print(
            f"detector: {label} stopped by {result.stopped_by} after {len(result.losses)} steps "
            f"({result.seconds:.1f}s)",
            flush=True,
        )
    scores, preds = evaluate(detector, ctx.test_images, ctx.test_masks, ctx.device, ctx.settings.eval_batch_size)
    run.update(scores, preds=preds, trainable_params=detector.num_trainable, texts=detector.texts)
    if detector.evidence_weight is not None:
        run["evidence_weight"] = round(float(detector.evidence_weight.detach()), 4)
    return run, detector


def score_seed(ctx: Context, variant: Variant, seed: int) -> tuple[dict[str, Any], ClassMapDetector | None]:
    """One seed of any variant: its run dict (scores, cost, maps, per-tile confusions) and its model, if a CLIP one."""
    model: ClassMapDetector | None = None
    if variant.kind in PIXEL_BASELINES:
        train, test = shot_tiles(ctx, variant), (ctx.test_images, ctx.test_masks)
        on_step = _step_printer(f"{variant.name} seed {seed}", ctx.settings.baselines.unet.steps)
        result = run_baseline(
            variant.kind, train, test, list(ctx.classes), ctx.settings, seed, ctx.device, ctx.threads, on_step
        )
        run = result.as_run(seed) | {"trainable_params": result.trainable_params}
    else:
        run, model = tune_and_score(ctx, variant, seed)
    run["tile_conf"] = tile_confusions(ctx.test_masks.numpy(), run["preds"], len(ctx.classes), MASK_NODATA)
    return run, model


# One process's Context for the (root, run identity) it last served: the stage's own process seeds it
# for the serial loop; each worker process of `compute` builds it once, from the backbone file the stage
# wrote and the prepared tiles.
CONTEXTS: ProcessLocal[Context] = ProcessLocal()


def load_context(
    root: Path, params: Params, clip: torch.nn.Module, tokenizer: Any, out_dir: Path, device: torch.device
) -> Context:
    """The legend, the few-shot and test tiles around a frozen CLIP."""
    settings, prepared = params.detector, root / params.data.prepared_dir
    classes = read_legend(prepared)
    test_images, test_masks = load_tiles(open_split(prepared, "seg_test", "rgb", masks=True))
    fewshot = open_split(prepared, "fewshot", "rgb", masks=True)
    novel = novel_classes(settings, list(classes))
    threads = params.compute.cell_threads
    return Context(
        settings, classes, novel, clip, tokenizer, fewshot, test_images, test_masks, out_dir, device, threads
    )


def worker_context(root: Path, params: Params, out_dir: Path, info: dict[str, Any]) -> Context:
    """The stage's Context rebuilt in another process: the same frozen weights (the fallback from the
    stage's folder, else the configured ones), tiles and settings."""
    backbone_file = info.get("backbone_file")
    configured = resolve_pretrained(root, params.detector.clip.pretrained)
    clip, tokenizer, _ = load_clip(
        params.detector.clip.model, str(out_dir / backbone_file) if backbone_file else configured
    )
    device = pick_device()
    return load_context(root, params, freeze(clip.to(device)), tokenizer, out_dir, device)


@dataclass(frozen=True)
class StageRun:
    """What a cell needs of the stage's run to rebuild its Context: `identity` names the params, data
    and seed (a remote Dask worker outlives one run), `out_dir` holds the backbone and checkpoints."""

    root: Path
    params: Params
    identity: str
    out_dir: Path
    info: dict[str, Any]

    @property
    def key(self) -> str:
        return f"{self.root}|{self.identity}"

    def context(self) -> Context:
        return CONTEXTS.get(self.key, lambda: worker_context(self.root, self.params, self.out_dir, self.info))


def detector_cell(
    stage: StageRun, variant: Variant, seed: int, keep: bool
) -> tuple[dict[str, Any], ClassMapDetector | None]:
    """One (variant, seed): its run dict and, where `keep`, its model. It reads its inputs itself, so it
    can run in another process (tasks/training/parallel.py)."""
    ctx = stage.context()
    run, model = score_seed(ctx, variant, seed)
    return run, model if keep else None


def run_cells(
    stage: StageRun, variants: list[Variant], head: str
) -> dict[str, list[tuple[dict[str, Any], ClassMapDetector | None]]]:
    """Variant name -> (run, model) per seed, on params' `compute` task runner (one after another by
    default). Only the head's first seed brings its model back: it is what the stage saves."""
    cells = [(variant, i, seed) for variant in variants for i, seed in enumerate(variant.seeds)]
    calls = [
        {"stage": stage, "variant": variant, "seed": seed, "keep": variant.name == head and i == 0}
        for variant, i, seed in cells
    ]
    names = [f"{variant.name}/seed{seed}" for variant, _, seed in cells]
    results = iter(run_all(detector_cell, calls, names, stage.params.compute))
    return {variant.name: [next(results) for _ in variant.seeds] for variant in variants}


def log_variant(ctx: Context, variant: Variant, runs: list[dict[str, Any]], tracker: StageTracker) -> dict[str, Any]:
    """Every seed of one variant in its own nested run; returns the aggregate."""
    with tracker.child(variant.name, tags={"ms2rgb.variant": variant.name}) as child:
        child.log_params({"kind": variant.kind, "mode": variant.mode, "shots": variant.shots, "seeds": variant.seeds})
        for run in runs:
            if run.get("losses"):
                child.log_metric_series(f"train_loss_seed{run['seed']}", run["losses"])
            child.log_metrics({"miou_by_seed": run["miou"]}, step=run["seed"])
        result = aggregate(variant, runs, ctx.settings.tune.max_steps, ctx.novel)
        if "texts" in runs[0]:  # a CLIP variant: the texts its first seed's prompts read
            child.log_params({"texts": "; ".join(runs[0]["texts"])})
        child.log_metrics({k: v for k, v in result.items() if isinstance(v, (int, float)) and v is not None})
        child.log_json({k: v for k, v in result.items() if k not in ("preds", "losses", "tile_conf")}, "variant.json")
    print(
        f"detector: {variant.name}: mIoU {result['miou']:.3f} ± {result['miou_std']:.3f} over "
        f"{len(runs)} seed(s) [{result['miou_ci95'][0]:.3f}, {result['miou_ci95'][1]:.3f}], "
        f"pixel accuracy {result['pixel_accuracy']:.3f}",
        flush=True,
    )
    return result


def tuned_pixel_size(fewshot: CachedSplit) -> float | None:
    """The GSD (m) of the tiles the detector is tuned on, which `ms2rgb detect` checks images against:
    PIXEL_SIZE for the project's Sentinel-2 tiles; None (unknown, not checked) for a user's own
    images (`ms2rgb data masks`), which keep their GSD and whose cached tiles do not record it."""
    return None if any(i.startswith(FOLDER_SOURCE_PREFIX) for i in fewshot.ids) else PIXEL_SIZE


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
        "pixel_evidence": evidence_payload(detector),
        "class_names": detector.class_names,
        "texts": detector.texts,
        "pixel_size_m": tuned_pixel_size(ctx.fewshot),
    }
    return write_atomic(ctx.out_dir / DETECTOR_FILE, lambda tmp: torch.save(payload, tmp))


def backbone(
    root: Path, params: Params, out_dir: Path, classes: dict[str, str], tracker: StageTracker, device: torch.device
) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """The frozen CLIP: configured weights, or the fallback, reused from the last run when the
    pretraining inputs (its params, the captions tiles, the seed, the legend) are unchanged."""
    settings, prepared = params.detector, root / params.data.prepared_dir
    captions_digest = require_validated(root, prepared, {"captions": ("rgb",)})
    # What the fallback's weights depend on: the dense term aligns the layers the prompts score.
    backbone_name = model_name(params.tracking.model_prefix, "clip-backbone")
    pretraining = (  # and the name it is registered under, which the detector's report names
        backbone_name,
        settings.clip.model_dump(),
        settings.pretrain.model_dump(),
        settings.prompt.similarity_layers,
        settings.prompt.logit_scale,
    )
    reuse = (
        fingerprint(
            pretraining,
            captions_digest,
            params.seed,
            classes,
        ),
        [root / OUT_DIR],
    )
    clip_cfg = settings.clip.model_copy(update={"pretrained": resolve_pretrained(root, settings.clip.pretrained)})
    return prepare_backbone(
        clip_cfg,
        settings.pretrain,
        lambda: open_split(prepared, "captions", "rgb", masks=True),
        out_dir,
        params.seed,
        device,
        tracker,
        classes,
        settings.prompt,
        reuse,
        registered_name=backbone_name,
    )


def run(root: Path, params: Params, tracker: StageTracker) -> dict[str, Any]:
    """Stage entry point (DVC and Prefect call this alike)."""
    start = time.perf_counter()
    settings, seed, device = params.detector, params.seed, pick_device()
    prepared = root / params.data.prepared_dir
    data_digest = require_validated(root, prepared, READS)
    classes = read_legend(prepared)
    threads = params.compute.cell_threads  # the cells' numbers depend on it, unlike on `workers`
    tracker.log_params(
        {
            "detector": settings.model_dump(),
            "seed": seed,
            "device": str(device),
            "classes": list(classes),
            "cell_threads": threads,
        }
    )
    # Swapped in whole by the stage runner after success; what a killed run of these params and
    # data left here (backbone, tuning checkpoints) is picked up again.
    identity = fingerprint(settings.model_dump(), data_digest, seed, classes, threads)
    out_dir = staging_dir(root, "detector")
    if distributed.is_writer():  # under torchrun process 0 alone keeps or empties what a killed run left
        resumable_staging_dir(root, "detector", identity)
    distributed.barrier()
    clip, tokenizer, info = backbone(root, params, out_dir, classes, tracker, device)
    ctx = load_context(root, params, clip, tokenizer, out_dir, device)
    shots, variants = settings.shots, plan(settings, seed)
    head_name = f"full_k{max(shots)}"
    stage = StageRun(root, params, identity, out_dir, info)
    CONTEXTS.put(stage.key, ctx)  # the serial loop uses this process's own
    try:
        cells = run_cells(stage, variants, head_name)
    finally:
        CONTEXTS.clear()  # a served process runs many stages: do not keep the backbone and tiles
    if not distributed.is_writer():  # under torchrun the others tuned in step; process 0 saves and registers
        return {}
    results = {v.name: log_variant(ctx, v, [run for run, _ in cells[v.name]], tracker) for v in variants}
    head = cells[head_name][0][1]
    assert head is not None, "the full method is a CLIP variant"
    save_detector(ctx, head, info)
    test_tiles = (ctx.test_images, ctx.test_masks)
    log_figures(results, shots, settings.tune.loss_threshold, test_tiles, settings.examples, tracker, list(classes))
    report = summarise(results, shots, info, ctx.novel)
    example = ctx.test_images[:1].numpy().astype(np.float32)  # serving input: RGB 0..255, any multiple of 8
    registered = model_name(params.tracking.model_prefix, "detector")
    version = tracker.log_pyfunc_model(  # weights as detector.pt (+ backbone.pt) artifacts; serves class ids
        LandCoverPyfunc(),
        detector_artifacts(ctx.out_dir / DETECTOR_FILE, root),
        example,
        registered,
        any_size=True,
        metadata={"class_names": list(head.class_names)},
        extra_requirements=SERVING["extra_requirements"],
    )
    report.update(registered_model=f"{registered}/{version}", stage_seconds=round(time.perf_counter() - start, 1))
    return report
