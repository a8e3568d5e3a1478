"""teacher stage (docs/methods.md §A.1): a SceneCNN over the 13 MS bands, trained on labelled MS tiles.

It trains on every labelled MS tile it may use: ms_train and the MS half of pair_train (the
matcher's true pairs, whose classes are known). pair_test and test stay held out.

Outputs: artifacts/teacher/model.pt (weights + config, read by the pairs and student stages),
artifacts/teacher/checkpoints/epoch_XXX.pt, reports/teacher.json; the model is registered in
MLflow as `<tracking.model_prefix>-teacher` (`ms2rgb-teacher` by default).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from ms2rgb.models.bands import S2_BANDS
from ms2rgb.models.classifier import SceneCNN
from ms2rgb.tasks.config import Params, TeacherConfig, model_name
from ms2rgb.tasks.data.artifacts import MODEL_FILE, staging_dir
from ms2rgb.tasks.data.cache import CachedSplit, open_split, require_bands
from ms2rgb.tasks.data.classes import SCENE_NAMES
from ms2rgb.tasks.data.validated import require_validated
from ms2rgb.tasks.errors import DataError
from ms2rgb.tasks.tracking import StageTracker
from ms2rgb.tasks.training.inference import predict_logits
from ms2rgb.tasks.training.loop import (
    FitConfig,
    batch_bounds,
    fingerprint,
    fit_classifier,
    seed_everything,
    to_tensor,
)
from ms2rgb.tasks.training.metrics import accuracy_report
from ms2rgb.tasks.training.progress import epoch_printer, log_curves, log_evaluation
from ms2rgb.tasks.training.store import save_model

TRAIN_SPLITS = ("ms_train", "pair_train")
READS = {"ms_train": ("ms",), "pair_train": ("ms",), "test": ("ms",)}  # split -> modalities; dvc.yaml lists their files


def fit_config(cfg: TeacherConfig, n_tiles: int) -> FitConfig:
    """The budget in steps as epochs over `n_tiles`: a small real set gets as many updates as a large
    one, rather than a few epochs' worth."""
    epochs = max(1, round(cfg.steps / len(batch_bounds(n_tiles, cfg.batch_size))))
    return FitConfig(epochs=epochs, batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay)


def labelled_ms(prepared: Path, split: str) -> CachedSplit:
    """A labelled MS split, checked for 13 bands and for labels on every tile."""
    tiles = require_bands(open_split(prepared, split, "ms"), S2_BANDS, f"{prepared}/{split}-ms.npy")
    unlabelled = int((tiles.labels < 0).sum())
    if unlabelled:
        raise DataError(
            f"split {split!r}",
            f"{unlabelled} tile(s) have no scene class",
            "only labelled MS tiles belong in ms_train, pair_train and test; ingested scenes go to ms_pool",
        )
    return tiles


def run(root: Path, params: Params, tracker: StageTracker) -> dict[str, Any]:
    """Stage entry point (DVC and Prefect call this alike)."""
    start = time.perf_counter()
    cfg, seed = params.teacher, params.seed
    prepared = root / params.data.prepared_dir
    data_digest = require_validated(root, prepared, READS)
    parts, test = [labelled_ms(prepared, split) for split in TRAIN_SPLITS], labelled_ms(prepared, "test")
    images = np.concatenate([np.asarray(part.images) for part in parts])  # (N, 13, H, W)
    labels = np.concatenate([part.labels for part in parts])
    tracker.log_params({"teacher": cfg.model_dump(), "seed": seed})
    out = staging_dir(root, "teacher")  # swapped in whole by the stage runner after success
    seed_everything(seed)  # before building: the initial weights come from the global generator
    model = SceneCNN(cfg.model(S2_BANDS))
    history = fit_classifier(
        model,
        images,
        labels,
        fit_config(cfg, len(labels)),
        seed,
        on_epoch=epoch_printer("teacher"),
        augment=cfg.augment,
        checkpoint_dir=out / "checkpoints",
        fingerprint=fingerprint(cfg.model_dump(), seed, data_digest),
    )
    report = accuracy_report(predict_logits(model, test.images), test.labels, SCENE_NAMES)
    print(f"teacher: MS test accuracy {report['accuracy']:.3f} on {len(test.labels)} tiles", flush=True)
    save_model(out / MODEL_FILE, "scene_cnn", model, model.cfg)
    log_curves(tracker, history, "teacher (MS)", "teacher/training_curves.png")
    log_evaluation(tracker, report, "teacher (MS test)", "teacher")
    # Pickled (not exported): `evaluate` re-scores a champion as the SceneCNN it is.
    example = to_tensor(test.images, np.arange(2)).numpy()
    registered = model_name(params.tracking.model_prefix, "teacher")
    version = tracker.log_torch_model(model, example, registered, serialization_format="pickle")
    return {
        "test_accuracy": report["accuracy"],
        "per_class": report["per_class"],
        "confusion": report["confusion"],
        "train_loss": history[-1].loss,
        "train_accuracy": history[-1].accuracy,
        "train_tiles": len(labels),
        "test_tiles": len(test.labels),
        "steps": cfg.steps,
        "epochs": len(history),
        "model_version": int(version or 0),
        "seconds": round(time.perf_counter() - start, 2),
    }
