"""What every RGB student trains and tests on, loaded and teacher-encoded once (docs/methods.md §A.4).

Shared by the `student` stage (the production student) and the `compare` stage (every variant at
every label budget), so it lives below both. Label scarcity is made here: of the rgb_train tiles,
only the first K per class (in the prepared order, the same for every variant and seed) keep their
label; the others get -1. Their true class goes only to `truth`, which scores pseudo-labels and
re-matching rounds and never reaches a loss.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from ms2rgb.models.bands import RGB_BANDS, S2_BANDS
from ms2rgb.models.classifier import SceneCNN, SceneCNNConfig
from ms2rgb.tasks.config import Params
from ms2rgb.tasks.data.artifacts import model_path, stage_dir
from ms2rgb.tasks.data.cache import CachedSplit, open_split, require_bands
from ms2rgb.tasks.data.classes import first_k_of_each
from ms2rgb.tasks.data.geotiff import sha256_of
from ms2rgb.tasks.data.pairing import PAIRS_FILE, load_true_pairs, read_pairs
from ms2rgb.tasks.errors import DataError
from ms2rgb.tasks.training.distill import StudentSet, join_banks, random_partners, teacher_bank
from ms2rgb.tasks.training.loop import fingerprint
from ms2rgb.tasks.training.store import load_model
from ms2rgb.tasks.training.variants import Variant

# split -> modalities (dvc.yaml lists exactly their files): RGB train/test, the MS pool, true pairs.
READS = {"rgb_train": ("rgb",), "test": ("rgb",), "ms_pool": ("ms",), "pair_train": ("ms", "rgb")}


def student_arch(teacher: SceneCNNConfig) -> SceneCNNConfig:
    """The teacher's architecture on the RGB bands: equal feature maps at the distilled layer (A.4)."""
    return replace(teacher, bands=RGB_BANDS, from_8bit=True)


def upstream_identity(root: Path, params: Params, data_digest: str) -> str:
    """Names the data, upstream models and student config a run depends on: checkpoints resume only under it."""
    upstream = [sha256_of(model_path(root, "teacher")), sha256_of(stage_dir(root, "pairs") / PAIRS_FILE)]
    return fingerprint(params.student.model_dump(), data_digest, upstream)


def _labelled(split: CachedSplit, name: str) -> CachedSplit:
    require_bands(split, RGB_BANDS, f"{name}/rgb")
    if (split.labels < 0).any():
        raise DataError(
            name,
            f"{int((split.labels < 0).sum())} RGB tile(s) have no class",
            "the student's train and test tiles must carry their class in the manifest; re-run prepare",
        )
    return split


class StudentInputs:
    """The teacher, the RGB train/test tiles, the teacher bank of the MS pool and the pairs table."""

    def __init__(self, root: Path, params: Params) -> None:
        self.root = root
        prepared = root / params.data.prepared_dir
        self.labelled_share = params.student.labelled_share
        self.teacher: SceneCNN = load_model(model_path(root, "teacher"), "scene_cnn", "teacher")
        if self.teacher.bands != S2_BANDS:
            raise DataError(
                model_path(root, "teacher"),
                f"the teacher reads bands {self.teacher.bands}",
                f"the teacher must read the 13 MS bands {S2_BANDS}; re-run the teacher stage",
            )
        self.rgb = _labelled(open_split(prepared, "rgb_train", "rgb"), "rgb_train")
        self.test = _labelled(open_split(prepared, "test", "rgb"), "test")
        pool = require_bands(open_split(prepared, "ms_pool", "ms"), S2_BANDS, "ms_pool/ms")
        self.pairing = read_pairs(stage_dir(root, "pairs") / PAIRS_FILE, self.rgb.ids, pool.ids)
        self.pool_bank = teacher_bank(self.teacher, np.asarray(pool.images))
        self.true_pairs = load_true_pairs(prepared, "pair_train")
        self.rgb_images = np.asarray(self.rgb.images)
        self.truth = np.array(self.rgb.labels)  # scores pseudo-labels only; never handed to a loss
        self.identity = ""  # names data, upstream models and config (upstream_identity), for resumable runs

    @property
    def arch(self) -> SceneCNNConfig:
        return student_arch(self.teacher.cfg)

    def data_for(self, variant: Variant, seed: int, k: int | None) -> tuple[StudentSet, np.ndarray]:
        """The training set of `variant` with `k` labels per class (None: all), and its true classes."""
        shown = first_k_of_each(self.truth, None if variant.every_label else k)
        rows = np.arange(len(shown)) if variant.unlabelled else np.flatnonzero(shown)
        labels = np.where(shown, self.truth, -1)[rows]
        images, truth = self.rgb_images[rows], self.truth[rows]
        if variant.partners == "none":
            return StudentSet(images, labels, None, None, None, self.labelled_share), truth
        if variant.partners == "true":
            return self._with_true_pairs(images, labels, truth, self.pairing.same_class[rows])
        partners = np.where(shown, self.pairing.same_class, self.pairing.free)[rows]
        weights = np.where(shown, 1.0, self.pairing.confidence)[rows].astype(np.float32)
        if variant.partners == "random":  # keep each tile's class (label or match), draw the MS tile
            partners = random_partners(self.pool_bank.classes[partners], self.pool_bank, seed)
        return StudentSet(images, labels, self.pool_bank, partners, weights, self.labelled_share), truth

    def _with_true_pairs(
        self, images: np.ndarray, labels: np.ndarray, truth: np.ndarray, partners: np.ndarray
    ) -> tuple[StudentSet, np.ndarray]:
        """paired_kd: the given labelled tiles (with their same-class partners) plus pair_train's RGB
        tiles, unlabelled, each with its own same-location MS tile as partner."""
        pairs = self.true_pairs
        bank = join_banks(self.pool_bank, teacher_bank(self.teacher, pairs.ms))
        own = len(self.pool_bank.classes) + np.arange(len(pairs.labels))  # rows of the pair tiles in `bank`
        n = len(labels) + len(pairs.labels)
        data = StudentSet(
            np.concatenate([images, pairs.rgb]),
            np.concatenate([labels, np.full(len(pairs.labels), -1)]),
            bank,
            np.concatenate([partners, own]),
            np.ones(n, dtype=np.float32),
            self.labelled_share,
        )
        return data, np.concatenate([truth, pairs.labels])
