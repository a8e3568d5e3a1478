"""params.yaml -> one typed, checked `Params` object, parsed once per run.

params.yaml is the only home of hyperparameters: the models below declare types and bounds but
no default values, so there is no second default that could disagree with the file. Unknown
keys are rejected with the valid names, every field is checked (optional ones too), and every
error is a ParamsError naming the key, the value and the fix. The selected profile's overrides
are applied to the base sections; the base and every profile must each be valid on their own.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails

from ms2rgb.models.bands import RGB_BANDS, S2_BANDS
from ms2rgb.models.classifier import SceneCNNConfig
from ms2rgb.models.clip_prompt import PromptConfig
from ms2rgb.models.matcher import MatcherConfig
from ms2rgb.tasks.data.manifest import EUROSAT_SPLITS, SEGMENTATION_SPLITS, SPLITS
from ms2rgb.tasks.data.weak_labels import IndexThresholds
from ms2rgb.tasks.errors import ParamsError, ParamsFileError

PARAMS_FILE = "params.yaml"
# YAML gives lists; sequences are tuples once parsed (hashable, immutable like the rest).
Splits = Annotated[tuple[str, ...], Field(strict=False)]
Ints = Annotated[tuple[int, ...], Field(strict=False, min_length=1)]


def _odd_sides(value: tuple[int, ...]) -> tuple[int, ...]:
    if any(w < 3 or w % 2 == 0 for w in value):
        raise ValueError(f"window sides must be odd and >= 3 (centred on the pixel), got {list(value)}")
    return value


Windows = Annotated[Ints, AfterValidator(_odd_sides)]  # sides of square windows centred on a pixel


class Section(BaseModel):
    """A params.yaml section: no defaults, no unknown keys, no silent type coercion."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _known_splits(key: str, splits: tuple[str, ...]) -> tuple[str, ...]:
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise ValueError(f"unknown split(s) {unknown} in {key}; valid splits are {list(SPLITS)}")
    return splits


class SegmentationConfig(Section):
    source: Literal["synth", "folder", "scenes"]  # where the detector's tiles (captions/fewshot/seg_test) come from
    folder: str  # folder: what `ms2rgb data masks` wrote (tiles, manifest, legend), relative to the project
    block_tiles: int = Field(ge=1, le=64)  # scenes: tiles per side of a block; a block goes to one split whole
    shares: dict[str, Annotated[float, Field(ge=0, le=1)]]  # scenes: share of the blocks; folder: of the images

    @field_validator("shares")
    @classmethod
    def _shares_fill_the_detector_splits(cls, value: dict[str, float]) -> dict[str, float]:
        if set(value) != set(SEGMENTATION_SPLITS):
            raise ValueError(f"give a share for each of {list(SEGMENTATION_SPLITS)}, got {sorted(value)}")
        if abs(sum(value.values()) - 1.0) > 1e-6 or min(value.values()) <= 0:
            raise ValueError(f"the shares must be > 0 and sum to 1 (sum {sum(value.values()):g})")
        return value


class DataConfig(Section):
    source: Literal["synth", "eurosat"]  # where the labelled tiles come from
    raw_dir: str  # tiles + manifest of the source
    scenes_dir: str  # one folder per scene added by `ms2rgb data ingest`
    prepared_dir: str  # merged manifest + memory-mapped cache
    eurosat_ms_dir: str | None  # EuroSAT_MS root when source=eurosat
    eurosat_rgb_dir: str | None  # optional EuroSAT RGB root
    eurosat_split_fractions: dict[str, Annotated[float, Field(ge=0, le=1)]]  # of each class's locations
    eurosat_test_list: str | None  # a file of tile names (one per line) or a folder of tiles: the test split
    segmentation: SegmentationConfig
    max_cloud_share: float = Field(ge=0, le=1)  # scene tiles with more cloud (s2cloudless) are not ingested
    # DN offset added to bare band files at ingestion (-1000 from baseline 04.00); products bring their own
    radiometric_offset: int = Field(ge=-10000, le=0)

    @field_validator("eurosat_split_fractions")
    @classmethod
    def _fractions_fill_known_splits(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = [k for k in value if k not in EUROSAT_SPLITS]
        if unknown:
            raise ValueError(f"unknown split(s) {unknown}; EuroSAT fills {list(EUROSAT_SPLITS)}")
        if abs(sum(value.values()) - 1.0) > 1e-6:
            raise ValueError(f"the fractions sum to {sum(value.values()):g}; make them sum to 1")
        return value

    @model_validator(mode="after")
    def _eurosat_needs_its_folder(self) -> DataConfig:
        if self.source == "eurosat" and not self.eurosat_ms_dir:
            raise ParamsError(
                "data.eurosat_ms_dir",
                self.eurosat_ms_dir,
                "set it to the EuroSAT_MS folder (class sub-folders of 13-band tifs)",
            )
        return self


class WeakLabelsConfig(Section):
    """Thresholds of the spectral-index rules that label scene pixels (tasks/data/weak_labels.py)."""

    ndwi_min: float = Field(ge=-1, le=1)
    mndwi_min: float = Field(ge=-1, le=1)
    ndvi_dense: float = Field(ge=-1, le=1)
    ndvi_low: float = Field(ge=-1, le=1)
    ndvi_bare: float = Field(ge=-1, le=1)
    ndbi_min: float = Field(ge=-1, le=1)
    bsi_min: float = Field(ge=-1, le=1)
    margin: float = Field(ge=0, le=0.5)

    def thresholds(self) -> IndexThresholds:
        return IndexThresholds(**self.model_dump())


class SynthConfig(Section):
    rgb_ambiguity: float = Field(ge=0, le=1)  # 0: RGB separates all surfaces; 1: confusable groups identical
    illumination: float = Field(ge=0, le=0.5)  # per-tile brightness factor drawn from 1 +- this
    spectral_jitter: float = Field(ge=0, le=0.5)  # per-tile, per-surface, per-band relative spectrum change
    texture: float = Field(ge=0, le=0.5)  # amplitude of smooth within-surface texture
    noise: float = Field(ge=0, le=0.5)  # relative per-pixel sensor noise
    crs: str  # CRS of the synthetic tiles, e.g. EPSG:32633
    per_class: dict[str, Annotated[int, Field(ge=0)]]  # locations per scene class and split

    @field_validator("per_class")
    @classmethod
    def _splits_exist(cls, value: dict[str, int]) -> dict[str, int]:
        _known_splits("synth.per_class", tuple(value))
        return value


class ValidateConfig(Section):
    max_nodata_share: float = Field(ge=0, le=1)  # per tile, share of pixels 0 in every band (or NaN)
    min_class_share: float = Field(ge=0, le=1)  # class balance bounds among each split's labelled rows
    max_class_share: float = Field(ge=0, le=1)
    ms_value_max: int = Field(ge=1, le=65535)  # uint16 reflectance x10000 ceiling (65535: the physical range)
    max_saturated_share: float = Field(ge=0, le=1)  # per MS tile, share of pixels saturated (65535) in any band
    max_cloud_share: float = Field(ge=0, le=1)  # per scene tile, share of cloud recorded at ingestion
    max_ignore_share: float = Field(ge=0, le=1)  # per folder-source mask tile, share of ignored (255) pixels
    severity: dict[str, Literal["fail", "warn"]]  # "<batch>.<column>" -> what a failure does; unlisted: fail
    required_splits: Splits  # splits that must have rows
    balance_splits: Splits  # splits whose class shares are checked
    paired_splits: Splits  # splits that need ms + rgb per location
    max_listed: int = Field(ge=1, le=10_000)  # offending ids listed per failed expectation

    @field_validator("required_splits", "balance_splits", "paired_splits")
    @classmethod
    def _splits_exist(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _known_splits("validate", value)

    @model_validator(mode="after")
    def _bounds_ordered(self) -> ValidateConfig:
        if self.min_class_share > self.max_class_share:
            raise ParamsError(
                "validate.min_class_share",
                self.min_class_share,
                f"must not exceed validate.max_class_share ({self.max_class_share})",
            )
        return self


class TeacherConfig(Section):
    width: int = Field(ge=4, le=256)  # SceneCNN first-stage channels; the distilled map has 4*width
    stem_stride: int = Field(ge=1, le=2)  # 2: first conv at half resolution, 4x cheaper
    dropout: float = Field(ge=0, le=0.9)  # before the linear head
    steps: int = Field(ge=1, le=1_000_000)  # optimiser steps, whatever the size of ms_train
    batch_size: int = Field(ge=2, le=4096)
    lr: float = Field(ge=1e-6, le=1)  # AdamW peak learning rate (one-cycle)
    weight_decay: float = Field(ge=0, le=1)
    augment: bool  # random flips/rotations: overhead tiles have no up

    def model(self, bands: tuple[str, ...], from_8bit: bool = False) -> SceneCNNConfig:
        """The architecture for `bands`; the student uses the RGB bands for an equal feature shape."""
        return SceneCNNConfig(
            bands=bands, width=self.width, from_8bit=from_8bit, dropout=self.dropout, stem_stride=self.stem_stride
        )


class MatcherStageConfig(Section):
    embed_dim: int = Field(ge=2, le=4096)  # shared embedding size
    width: int = Field(ge=4, le=256)  # first-stage channels of each tower
    stem_stride: int = Field(ge=1, le=2)
    temperature: float = Field(ge=1e-3, le=10)  # InfoNCE temperature
    n_neg: int = Field(ge=1, le=1024)  # negatives per group, each of another class than the pair
    epochs: int = Field(ge=1, le=10_000)  # passes over pair_train (few true pairs exist)
    batch_size: int = Field(ge=4, le=4096)  # pairs per step; negatives come from the same batch
    lr: float = Field(ge=1e-6, le=1)
    weight_decay: float = Field(ge=0, le=1)
    augment: bool  # one flip/rotation per pair, shared by both tiles
    ms_tower: Literal["teacher", "cnn"]  # teacher: the frozen teacher encoder (embed_dim = 4 * teacher.width)

    def model(self, teacher: SceneCNNConfig | None = None) -> MatcherConfig:
        """The architecture; `teacher` (the trained teacher's config) is needed for ms_tower=teacher."""
        if self.ms_tower == "teacher" and teacher is None:
            raise ValueError("matcher.ms_tower=teacher needs the teacher's config")
        tower = teacher if self.ms_tower == "teacher" else None
        return MatcherConfig(
            rgb_bands=RGB_BANDS,
            ms_bands=S2_BANDS,
            embed_dim=4 * tower.width if tower else self.embed_dim,
            width=self.width,
            temperature=self.temperature,
            stem_stride=self.stem_stride,
            teacher=tower,
        )


class PairsConfig(Section):
    batch_size: int = Field(ge=1, le=65536)  # tiles per inference batch (teacher and matcher)
    temperature: float = Field(ge=1e-3, le=10)  # matcher scores / this enter the Sinkhorn assignment
    sinkhorn_iters: int = Field(ge=1, le=10_000)  # balancing rounds: no MS tile absorbs most RGB tiles
    chunk_tiles: int = Field(ge=1)  # pool tiles per pseudo-labelling call on params' `compute` runner


class StudentConfig(Section):
    steps: int = Field(ge=1, le=1_000_000)  # optimiser steps, the same for every variant whatever its set size
    batch_size: int = Field(ge=2, le=4096)
    lr: float = Field(ge=1e-6, le=1)  # AdamW peak (one-cycle), also for the attention module
    weight_decay: float = Field(ge=0, le=1)
    augment: bool
    rgb_labels_per_class: int | None = Field(ge=1)  # labelled rgb_train tiles per class; null: all
    labelled_share: float = Field(gt=0, le=1)  # least share of each epoch drawn from the labelled tiles
    w_feat: float = Field(ge=0, le=100)  # feature loss (cross-modal attention + MMD)
    w_kd: float = Field(ge=0, le=100)  # KL to the partner's teacher distribution at `temperature`
    w_ce: float = Field(ge=0, le=100)  # cross-entropy with the true label (labelled tiles only)
    temperature: float = Field(ge=0.05, le=100)  # KD and re-matching temperature
    heads: int = Field(ge=1, le=64)  # attention heads; must divide 4 * teacher.width
    rematch_rounds: int = Field(ge=0, le=1000)  # re-matching rounds, evenly spread over training; 0: off
    rematch_epsilon: float = Field(gt=0, le=10)  # entropy of the balanced re-matching (Sinkhorn on JS / this)
    rematch_views: int = Field(ge=1, le=8)  # flips/rotations averaged into the prediction re-matching reads
    self_training_threshold: float = Field(gt=0, le=1)  # FixMatch: confidence a pseudo-label needs
    w_self_training: float = Field(ge=0, le=100)  # FixMatch term of the variants that use it


# The student variants tasks/training/variants.py defines (a test keeps the two lists equal); named
# here so that a bad name stops the run before any stage, without the config loading training code.
VariantName = Literal[
    "rgb_only",
    "label_smoothing",
    "self_training",
    "paired_kd",
    "full_method",
    "full_method_self_training",
    "oracle",
    "no_feature_loss",
    "no_rematch",
    "kd_random_pairs",
]


class CompareGrid(Section):
    shots: Annotated[tuple[Annotated[int, Field(ge=1)] | None, ...], Field(strict=False, min_length=1)]
    variants: Annotated[tuple[VariantName, ...], Field(strict=False, min_length=1)]
    seeds: int = Field(ge=1, le=100)  # seeds per variant and K: seed, seed+1, ...


class CompareConfig(Section):
    grid: str  # the entry of `grids` that the compare stage runs (`make compare` runs `full`)
    grids: dict[str, CompareGrid]  # labelled tiles per class (null: all) x variants
    bootstrap: int = Field(ge=100, le=100_000)  # paired resamples of the difference to rgb_only

    @model_validator(mode="after")
    def _grid_known(self) -> CompareConfig:
        if self.grid not in self.grids:
            raise ParamsError("compare.grid", self.grid, f"choose one of {sorted(self.grids)}")
        for name, grid in self.grids.items():
            if "rgb_only" not in grid.variants:
                raise ParamsError(
                    f"compare.grids.{name}.variants", list(grid.variants), "include rgb_only, the baseline"
                )
        return self


class ClipConfig(Section):
    model: str  # open_clip config name with a native ViT tower
    pretrained: str | None  # open_clip tag, local checkpoint path, or null = fallback pretraining

    @field_validator("model")
    @classmethod
    def _model_exists(cls, name: str) -> str:
        import open_clip

        from ms2rgb.models.clip_backbone import TINY_MODEL

        if name not in open_clip.list_models():
            raise ParamsError(
                "detector.clip.model",
                name,
                f"use an open_clip config name, e.g. {TINY_MODEL} (the offline default) or "
                "ViT-B-32; `python -c 'import open_clip; print(open_clip.list_models())'` lists them",
            )
        return name


class PretrainConfig(Section):
    steps: int = Field(ge=0)  # contrastive steps of the fallback (only when clip.pretrained is null)
    batch_size: int = Field(ge=2)  # image-caption pairs per step
    lr: float = Field(gt=0)  # AdamW peak; linear warm-up then cosine decay
    weight_decay: float = Field(ge=0)  # on matrices only (CLIP)
    warmup_steps: int = Field(ge=0)
    dense_weight: float = Field(ge=0)  # patch-text alignment to the captions' masks, beside the caption contrast


class PromptParams(Section):
    n_ctx: int = Field(ge=1)  # prompt vectors per prompted layer
    depth: int = Field(ge=1)  # prompted leading layers of both towers
    similarity_layers: Ints  # vision layers scored against the class texts
    logit_scale: float | None = Field(gt=0)  # patch-text temperature; null = the CLIP's own

    def model(self, mode: str) -> PromptConfig:
        return PromptConfig(
            n_ctx=self.n_ctx,
            depth=self.depth,
            similarity_layers=self.similarity_layers,
            mode=mode,
            logit_scale=self.logit_scale,
        )


class TuneConfig(Section):
    max_steps: int = Field(ge=1)  # hard cap on optimisation steps
    batch_size: int = Field(ge=1)  # tiles per step (the whole set when K-shot gives fewer)
    lr: float = Field(gt=0)  # AdamW learning rate of prompts and projections
    weight_decay: float = Field(ge=0)
    loss_threshold: float = Field(ge=0)  # stop once focal + dice stays under this ...
    patience: int = Field(ge=1)  # ... for this many consecutive steps
    focal_gamma: float = Field(ge=0)  # focal loss exponent
    checkpoint_every: int = Field(ge=1)  # steps between resumable checkpoints


class PixelForestConfig(Section):
    """The per-pixel random forest baseline (tasks/detection/pixel_forest.py)."""

    trees: int = Field(ge=1, le=1000)  # trees of the forest
    max_depth: int | None = Field(ge=1, le=64)  # null: grow until the leaves are pure (memory grows with pixels)
    max_pixels: int = Field(ge=100)  # labelled training pixels sampled from the shots (uniformly, seeded)
    windows: Windows  # sides of the square windows whose per-band mean and std join each pixel's RGB


class UNetBaselineConfig(Section):
    """The from-scratch U-Net baseline (models/unet.py, tasks/detection/unet_baseline.py)."""

    width: int = Field(ge=2, le=256)  # channels of the full-resolution stage, doubled at each downsampling
    depth: int = Field(ge=1, le=6)  # downsamplings; tile sides must be multiples of 2**depth
    steps: int = Field(ge=1, le=1_000_000)  # optimiser steps (AdamW, one-cycle)
    batch_size: int = Field(ge=1)  # tiles per step (the whole set when the shots are fewer)
    lr: float = Field(gt=0, le=1)  # AdamW peak learning rate
    weight_decay: float = Field(ge=0, le=1)


class BaselinesConfig(Section):
    """Method B's baselines without CLIP, trained on the same K-shot tiles as the prompts."""

    pixel_forest: PixelForestConfig
    unet: UNetBaselineConfig


class PixelEvidenceConfig(Section):
    """A per-pixel expert fitted on the shots; its class log-scores join the CLIP's logits (pixel_evidence.py)."""

    model: Literal["mlp", "gaussian"]  # per-pixel network (cross-entropy) or one Gaussian per class (closed form)
    windows: Windows  # sides of the windows whose per-band mean and std join each pixel's RGB
    hidden: int = Field(ge=1)  # mlp: width of its two hidden layers
    steps: int = Field(ge=1)  # mlp: Adam steps of 4096 shot pixels each
    lr: float = Field(gt=0)  # mlp: Adam's learning rate
    ridge: float = Field(gt=0)  # gaussian (and the max_likelihood baseline): added to each class's covariance
    # the evidence's weight before tuning (it trains with the prompts); auto: cross-fitted on the shots
    init_weight: Annotated[float, Field(ge=0)] | Literal["auto"]


# What detector.grids may name beside the method (tasks/detection/plan.py builds each of them).
DETECTOR_VARIANTS = (
    "zero_shot",
    "no_pixel_evidence",
    "text_prompts",
    "visual_prompts",
    "independent",
    "base_to_novel",
    "linear_probe",
    "meta_net",
    "pixel_forest",
    "unet",
    "max_likelihood",
    "pixel_mlp",
)


class DetectorConfig(Section):
    clip: ClipConfig
    pretrain: PretrainConfig
    prompt: PromptParams
    tune: TuneConfig
    pixel_evidence: PixelEvidenceConfig | None  # null: the CLIP's map alone (the seed's method)
    baselines: BaselinesConfig
    shots: Annotated[tuple[Annotated[int, Field(ge=1)], ...], Field(strict=False, min_length=1)]  # K per class
    zero_shot_template: str  # hand-written zero-shot prompt; {} is the class description
    eval_batch_size: int = Field(ge=1)
    examples: int = Field(ge=0)  # example tiles in the logged figure
    seeds: int = Field(ge=1)  # tuning seeds per variant at the largest K
    novel_classes: tuple[str, ...] | None = Field(strict=False)  # held out of tuning (base-to-novel); null: 2nd half
    grid: str  # which entry of `grids` the stage runs beside the method
    grids: dict[str, Annotated[tuple[str, ...], Field(strict=False)]]  # name -> compared variants (+ zero_shot)

    @model_validator(mode="after")
    def _known_grid(self) -> DetectorConfig:
        if self.grid not in self.grids:
            raise ValueError(f"grid={self.grid!r} is not one of grids {sorted(self.grids)}")
        for name, variants in self.grids.items():
            unknown = sorted(set(variants) - set(DETECTOR_VARIANTS))
            if unknown:
                raise ValueError(f"grids.{name} names {unknown}; valid variants are {list(DETECTOR_VARIANTS)}")
        return self

    @field_validator("zero_shot_template")
    @classmethod
    def _has_slot(cls, template: str) -> str:
        if "{}" not in template:
            raise ValueError("put {} where the class description goes")
        return template


class EvaluateConfig(Section):
    bootstrap: int = Field(ge=100, le=100_000)  # resamples of the test tiles for the 95 % interval
    ece_bins: int = Field(ge=2, le=100)  # equal-width confidence bins of the calibration error
    overlays: int = Field(ge=0, le=32)  # detector test tiles drawn with their predicted maps
    batch_size: int = Field(ge=1)  # tiles per inference batch


class PromoteConfig(Section):
    min_gain: float = Field(ge=0, le=1)  # the paired 95 % interval of the headline gain must lie above this
    max_regression: float = Field(ge=0, le=1)  # no other tracked metric may get worse by more


class ComputeConfig(Section):
    """How independent pieces of a stage (the compare grid's and the detector's cells) run: one after
    another, or at once."""

    workers: int = Field(ge=1, le=1024)  # cells at once; 1: one after another in the stage's own process
    # torch threads of every cell, serial or parallel: reductions split by the thread count, so one fixed
    # number keeps a cell's results the same for any `workers`
    cell_threads: int = Field(ge=1, le=256)
    device: str = Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$")  # auto: CUDA when torch sees one, else CPU
    task_runner: Literal["processes", "dask"]  # Prefect's process pool, or prefect-dask's runner (workers > 1)
    dask_address: str | None  # a running Dask scheduler (tcp://host:8786); null: a local cluster of `workers`
    # processes that train the teacher and the student together under torchrun (data parallel, summed
    # gradients); 1: the stage's own process. Each takes `threads` / nproc torch threads
    nproc: int = Field(ge=1, le=64)


class LandingConfig(Section):
    location: str  # folder (relative to the project) or fsspec URL where new scenes are dropped
    quarantine: str  # folder (relative to the project) or fsspec URL that receives bad scenes
    poll_seconds: int = Field(ge=1, le=86_400)  # interval of the watch/landing schedule
    stable_polls: int = Field(ge=1, le=100)  # consecutive polls with an unchanged size before a scene is taken

    @field_validator("location", "quarantine")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("give a folder (relative to the project) or an fsspec URL such as s3://bucket/drop")
        return value

    @model_validator(mode="after")
    def _quarantine_apart(self) -> LandingConfig:
        if self.quarantine.rstrip("/") == self.location.rstrip("/"):
            raise ParamsError(
                "landing.quarantine", self.quarantine, "must differ from landing.location (bad scenes move out of it)"
            )
        return self


# The registered models of a project, by the stage kind that trains them: each is registered as
# `<tracking.model_prefix>-<kind>` (model_name).
ModelKind = Literal["teacher", "matcher", "student", "detector", "clip-backbone"]
MODEL_KINDS: tuple[str, ...] = get_args(ModelKind)
# What MLflow accepts in a registered model name and what survives in its URIs (models:/NAME@ALIAS,
# models:/NAME/VERSION) and search filters (name='NAME'): no "/", ":", "@", quotes or spaces.
_PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
_EXPERIMENT_MAX = 500  # MLflow's limit on experiment names


class TrackingConfig(Section):
    """The names this project takes on a shared MLflow (and Prefect) server."""

    experiment: str  # the MLflow experiment every run of the project logs into
    model_prefix: str  # registered models are <prefix>-<kind>; deployments <flow>/<prefix>-<name>

    @field_validator("experiment")
    @classmethod
    def _experiment_name(cls, value: str) -> str:
        if not value.strip() or value != value.strip() or len(value) > _EXPERIMENT_MAX:
            raise ValueError(
                f"give a non-empty name of at most {_EXPERIMENT_MAX} characters without leading or trailing "
                "spaces, e.g. ms2rgb or team-a/ms2rgb"
            )
        if not value.isprintable():
            raise ValueError("the name holds a control character (a tab or a newline); use printable characters")
        return value

    @field_validator("model_prefix")
    @classmethod
    def _prefix_name(cls, value: str) -> str:
        if not _PREFIX.fullmatch(value):
            raise ValueError(
                "use 1 to 100 letters, digits, '-', '_' or '.', starting with a letter or digit (MLflow refuses "
                "'/' and ':' in model names, and '@' or a space breaks models:/ URIs), e.g. ms2rgb or team-a"
            )
        return value


def model_name(prefix: str, kind: ModelKind) -> str:
    """The registered model of `kind` in the project whose `tracking.model_prefix` is `prefix`:
    model_name(params.tracking.model_prefix, "detector") -> "ms2rgb-detector" (by default)."""
    if kind not in MODEL_KINDS:  # callers are typed; a name from a command line is checked here
        raise ValueError(f"unknown model kind {kind!r}; valid kinds are {list(MODEL_KINDS)}")
    return f"{prefix}-{kind}"


class Params(Section):
    """Every section of params.yaml after the profile's overrides."""

    profile: str
    seed: int
    threads: int = Field(ge=1, le=256)  # CPU threads: reductions split by thread count, so it is fixed
    data: DataConfig
    synth: SynthConfig
    weak_labels: WeakLabelsConfig
    validation: ValidateConfig = Field(alias="validate")  # `validate` is a BaseModel method name
    teacher: TeacherConfig
    matcher: MatcherStageConfig
    pairs: PairsConfig
    student: StudentConfig
    compare: CompareConfig
    detector: DetectorConfig
    evaluation: EvaluateConfig = Field(alias="evaluate")  # named like the stage
    promote: PromoteConfig
    compute: ComputeConfig
    landing: LandingConfig
    tracking: TrackingConfig

    @model_validator(mode="after")
    def _heads_divide_features(self) -> Params:
        channels = 4 * self.teacher.width  # the distilled feature map's channels
        if channels % self.student.heads:
            raise ParamsError(
                "student.heads",
                self.student.heads,
                f"must divide the distilled feature channels 4 * teacher.width = {channels}",
            )
        return self


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "per_class":
            out[key] = _merge(out[key], value)
        else:  # per_class is replaced whole: a profile lists exactly the splits it wants
            out[key] = copy.deepcopy(value)
    return out


def _fix(error: ErrorDetails, model: type[BaseModel], loc: tuple[Any, ...]) -> str:
    """The repair for one pydantic error, in the user's words."""
    if error["type"] == "extra_forbidden":
        node: Any = model
        for part in loc[:-1]:
            field = node.model_fields.get(part) or next(f for f in node.model_fields.values() if f.alias == part)
            node = field.annotation
        valid = sorted(f.alias or name for name, f in node.model_fields.items())
        return f"unknown key; valid keys here are {valid}"
    if error["type"] == "missing":
        return "the key is missing; add it (params.yaml in the repository lists every key with a comment)"
    return str(error["msg"]).replace("Value error, ", "")


def parse_params(raw: dict[str, Any], where: str = "") -> Params:
    """Validate a merged params mapping; `where` prefixes keys (e.g. "profiles.tiny.")."""
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        # A misspelt key shows up twice: as unknown and as missing. The unknown one says more.
        first = sorted(err.errors(), key=lambda e: e["type"] != "extra_forbidden")[0]
        loc = tuple(first["loc"])
        key = where + ".".join(str(p) for p in loc)
        value = None if first["type"] == "missing" else first.get("input")
        raise ParamsError(key, value, _fix(first, Params, loc)) from None
    except ParamsError as err:
        if where:
            raise ParamsError(where + err.key, err.value, err.fix) from None
        raise


def read_params_file(path: Path) -> dict[str, Any]:
    """The raw mapping in params.yaml; a YAML syntax error names the file, line and column."""
    if not path.exists():
        raise ParamsFileError(
            f"{path}: no such file. Fix: run from the project root (or pass --root), "
            "or copy the repository's params.yaml there"
        )
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f"{mark.line + 1}:{mark.column + 1}" if mark else "?"
        raise ParamsFileError(
            f"{path}:{where}: YAML syntax error: {err.problem}. Fix: correct the file at that "
            "line and column (indentation, brackets, quotes)"
        ) from None
    if not isinstance(raw, dict):
        raise ParamsFileError(
            f"{path}: holds {type(raw).__name__}, not a mapping of sections. Fix: restore "
            "the layout of the repository's params.yaml"
        )
    return raw


def merged_params(raw: dict[str, Any]) -> dict[str, Any]:
    """The base sections with the selected profile's overrides; base and every profile checked."""
    profiles = raw.get("profiles") or {}
    profile = raw.get("profile")
    if profile not in profiles:
        raise ParamsError("profile", profile, f"choose one of {sorted(profiles)}")
    base = {k: v for k, v in raw.items() if k != "profiles"}
    parse_params(base)  # an invalid base value is an error even where the profile overrides it
    for name, override in profiles.items():
        if name != profile:
            parse_params(_merge(base, override or {}), where=f"profiles.{name}: ")
    return _merge(base, profiles[profile] or {})


def load_params(root: Path) -> Params:
    """Read, merge and check <root>/params.yaml."""
    return parse_params(merged_params(read_params_file(root / PARAMS_FILE)))
