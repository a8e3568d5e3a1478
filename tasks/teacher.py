"""teacher stage (METHODS.md A.1): a SceneCNN over the 13 MS bands, trained on labelled MS tiles.

Outputs: artifacts/teacher/model.pt (weights + config, read by the pairs and student stages),
artifacts/teacher/checkpoints/epoch_XXX.pt, reports/teacher.json; the model is registered in
MLflow as `ms2rgb-teacher`.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.bands import S2_BANDS
from models.classifier import SceneCNN, SceneCNNConfig
from tasks.cache import CachedSplit, open_split, require_bands
from tasks.classes import SCENE_NAMES
from tasks.config import require_range, section
from tasks.errors import DataError
from tasks.model_store import MODEL_FILE, save_model
from tasks.progress import epoch_printer, log_curves, log_evaluation
from tasks.tracking import StageTracker
from tasks.training import FitConfig, accuracy_report, fit_classifier, predict_logits, seed_everything, to_tensor

ARTIFACTS = Path("artifacts") / "teacher"
REGISTERED_NAME = "ms2rgb-teacher"


@dataclass(frozen=True)
class TeacherConfig:
    width: int = 16            # SceneCNN first-stage channels; the distilled map has 4*width channels
    stem_stride: int = 2       # 2: first conv at half resolution, 4x cheaper, MS accuracy stays >= 95 %
    dropout: float = 0.1       # before the linear head
    epochs: int = 15           # passes over ms_train
    batch_size: int = 64       # tiles per step
    lr: float = 3e-3           # AdamW peak learning rate (one-cycle)
    weight_decay: float = 1e-4
    augment: bool = True       # random flips/rotations: overhead tiles have no up

    def check(self, name: str) -> None:
        require_range(f"{name}.width", self.width, 4, 256)
        require_range(f"{name}.stem_stride", self.stem_stride, 1, 2)
        require_range(f"{name}.dropout", self.dropout, 0.0, 0.9)
        require_range(f"{name}.epochs", self.epochs, 1, 1000)
        require_range(f"{name}.batch_size", self.batch_size, 2, 4096)
        require_range(f"{name}.lr", self.lr, 1e-6, 1.0)
        require_range(f"{name}.weight_decay", self.weight_decay, 0.0, 1.0)

    def fit(self) -> FitConfig:
        return FitConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay)

    def model(self, bands: tuple[str, ...], from_8bit: bool = False) -> SceneCNNConfig:
        """The architecture for `bands`; the student calls this with the RGB bands for an equal feature shape."""
        return SceneCNNConfig(bands=bands, width=self.width, from_8bit=from_8bit, dropout=self.dropout,
                              stem_stride=self.stem_stride)


def labelled_ms(prepared: Path, split: str) -> CachedSplit:
    """A labelled MS split, checked for 13 bands and for labels on every tile."""
    tiles = require_bands(open_split(prepared, split, "ms"), S2_BANDS, f"{prepared}/{split}-ms.npy")
    unlabelled = int((tiles.labels < 0).sum())
    if unlabelled:
        raise DataError(f"split {split!r}", f"{unlabelled} tile(s) have no scene class",
                        "only labelled MS tiles belong in ms_train/test; ingested scenes go to ms_pool")
    return tiles


def run(root: Path, params: dict[str, Any], tracker: StageTracker) -> dict[str, Any]:
    """Stage entry point (DVC and Prefect call this alike)."""
    start = time.perf_counter()
    cfg = section(params, "teacher", TeacherConfig)
    seed = int(params.get("seed", 0))
    prepared = root / params["data"]["prepared_dir"]
    train, test = labelled_ms(prepared, "ms_train"), labelled_ms(prepared, "test")
    tracker.log_params({"teacher": asdict(cfg), "seed": seed})
    out = root / ARTIFACTS
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # a fresh run; stale epochs would mislead a resume
    seed_everything(seed)  # before building: the initial weights come from the global generator
    model = SceneCNN(cfg.model(S2_BANDS))
    history = fit_classifier(model, np.asarray(train.images), train.labels, cfg.fit(), seed,
                             on_epoch=epoch_printer("teacher"), augment=cfg.augment,
                             checkpoint_dir=out / "checkpoints")
    report = accuracy_report(predict_logits(model, test.images), test.labels, SCENE_NAMES)
    print(f"teacher: MS test accuracy {report['accuracy']:.3f} on {len(test.labels)} tiles", flush=True)
    save_model(out / MODEL_FILE, "scene_cnn", model, model.cfg)
    log_curves(tracker, history, "teacher (MS)", "teacher/training_curves.png")
    log_evaluation(tracker, report, "teacher (MS test)", "teacher")
    version = tracker.log_torch_model(model, to_tensor(test.images, np.arange(2)).numpy(), REGISTERED_NAME)
    return {"test_accuracy": report["accuracy"], "per_class": report["per_class"],
            "confusion": report["confusion"], "train_loss": history[-1].loss,
            "train_accuracy": history[-1].accuracy, "train_tiles": len(train.labels),
            "test_tiles": len(test.labels), "epochs": cfg.epochs, "model_version": int(version or 0),
            "seconds": round(time.perf_counter() - start, 2)}
