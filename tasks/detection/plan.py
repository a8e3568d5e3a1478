"""What the detector stage compares: the method, its ablations, open vocabulary and the baselines.

Every variant is scored on the same ``seg_test`` tiles; tuned ones learn from the same K-shot tiles
with the same seeds. Kinds:

- ``prompts``: the frozen CLIP with learned prompts of one ``PromptConfig.mode`` (zero-shot: none);
- ``linear_probe`` / ``meta_net``: the same frozen CLIP with a 1x1 classifier on its patch features
  (``models/clip_linear_probe.py``), or CoCoOp's meta-network (``models/clip_meta_prompt.py``);
- ``pixel_forest`` / ``unet`` / ``max_likelihood`` / ``pixel_mlp``: no CLIP, fitted on the same
  shots (``tasks/detection/baselines.py``); the last is the default pixel evidence alone.

Every tuned CLIP variant adds the shots' per-pixel evidence to its map when ``detector.pixel_evidence``
is set (``models/pixel_evidence.py``); ``no_pixel_evidence`` is the full method without it, the seed's
method as written (a frozen CLIP and prompts alone).

``base_to_novel`` tunes the method with the novel classes' pixels unlabelled and scores all classes:
what the prompts learned from the base classes, and whether the novel ones still come from their
text alone (MaPLe's base-to-novel protocol, per pixel).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ms2rgb.tasks.config import DetectorConfig
from ms2rgb.tasks.errors import ParamsError

FULL_MODE = "coupled"
ABLATIONS = {"text_prompts": "text", "visual_prompts": "visual", "independent": "independent"}
PURE_METHOD = "no_pixel_evidence"  # the full method without the pixel evidence
CLIP_BASELINES = ("linear_probe", "meta_net")  # on the frozen CLIP
PIXEL_BASELINES = ("pixel_forest", "unet", "max_likelihood", "pixel_mlp")  # without it
META_NET_MODE = "independent"  # prompts the meta-network conditions: both branches, as the method
OPEN_VOCABULARY = "base_to_novel"


@dataclass(frozen=True)
class Variant:
    """One compared setting at K shots over some seeds."""

    name: str  # nested run and report key
    kind: str  # "prompts", or one of CLIP_BASELINES / PIXEL_BASELINES
    mode: str  # PromptConfig.mode of prompted kinds ("" for the others)
    shots: int  # K per class (0: no training)
    seeds: tuple[int, ...]  # the first is the params seed (its model is the one kept)
    hide_novel: bool = False  # novel classes' pixels unlabelled while tuning
    pixel_evidence: bool = True  # add the shots' per-pixel evidence (when params configure it and K > 0)


# What the config's DETECTOR_VARIANTS must list.
COMPARABLE = ("zero_shot", PURE_METHOD, *ABLATIONS, OPEN_VOCABULARY, *CLIP_BASELINES, *PIXEL_BASELINES)


def plan(settings: DetectorConfig, seed: int) -> list[Variant]:
    """The full method at every K, and what `settings.grid` sets beside it: zero-shot (one seed), and
    at the largest K over `settings.seeds` seeds the ablations, base-to-novel and the baselines.
    Smaller K get one seed."""
    shots, chosen = settings.shots, {"zero_shot", *settings.grids[settings.grid]}
    k, many = max(shots), tuple(range(seed, seed + settings.seeds))
    full = [Variant(f"full_k{s}", "prompts", FULL_MODE, s, many if s == k else (seed,)) for s in sorted(set(shots))]
    compared = (
        [Variant("zero_shot", "prompts", "zero_shot", 0, (seed,), pixel_evidence=False)]
        + [Variant(PURE_METHOD, "prompts", FULL_MODE, k, many, pixel_evidence=False)]
        + [Variant(name, "prompts", mode, k, many) for name, mode in ABLATIONS.items()]
        + [Variant(OPEN_VOCABULARY, "prompts", FULL_MODE, k, many, hide_novel=True)]
        + [
            Variant("linear_probe", "linear_probe", "", k, many),
            Variant("meta_net", "meta_net", META_NET_MODE, k, many),
        ]
        + [Variant(name, name, "", k, many, pixel_evidence=False) for name in PIXEL_BASELINES]
    )
    return compared[:1] + full + [v for v in compared[1:] if v.name in chosen]


def novel_classes(settings: DetectorConfig, legend: Sequence[str]) -> list[str]:
    """The classes held out of tuning: params' list, else the legend's second half (MaPLe's split)."""
    if settings.novel_classes is None:
        return list(legend[(len(legend) + 1) // 2 :])
    unknown = [name for name in settings.novel_classes if name not in legend]
    if unknown or len(settings.novel_classes) >= len(legend):
        raise ParamsError(
            "detector.novel_classes",
            list(settings.novel_classes),
            f"name some but not all of the legend's classes {list(legend)} (null: its second half)",
        )
    return list(settings.novel_classes)
