"""Captions for the fallback CLIP pretraining, written from a tile's scene class and mask composition.

Surfaces come first, largest share first, in the very words of their descriptions (the
segmentation source's legend, ``tasks/data/legend.py``; ``SURFACE_CLASSES`` for the synthetic
masks): those are the texts the detector later scores patches against, and
CLIP's 32-token context truncates the tail, which is where the scene description goes.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ms2rgb.tasks.data.classes import MASK_NODATA, SCENE_CLASSES, SCENE_NAMES, SURFACE_CLASSES

# (lowest share, word): a share at or above the bound gets the word; smaller shares go unmentioned.
SHARE_WORDS: tuple[tuple[float, str], ...] = ((0.5, "mostly"), (0.15, "some"), (0.03, "a little"))


def composition(mask: np.ndarray, classes: Mapping[str, str] = SURFACE_CLASSES) -> list[tuple[str, float]]:
    """(class name, share of valid pixels) for every class of the legend present, largest first."""
    names = list(classes)
    valid = mask[mask != MASK_NODATA]
    if valid.size == 0:
        return []
    counts = np.bincount(valid.ravel(), minlength=len(names))[: len(names)]
    shares = counts / valid.size
    order = np.argsort(-shares, kind="stable")
    return [(names[i], float(shares[i])) for i in order if shares[i] > 0]


def _share_word(share: float) -> str | None:
    return next((word for bound, word in SHARE_WORDS if share >= bound), None)


def caption(scene_label: int, mask: np.ndarray, classes: Mapping[str, str] = SURFACE_CLASSES) -> str:
    """E.g. 'a satellite image with mostly water, some grass and pasture; open water of a sea or lake'."""
    parts = [
        f"{word} {classes[name]}"
        for name, share in composition(mask, classes)
        if (word := _share_word(share)) is not None
    ]
    surfaces = ", ".join(parts[:-1]) + f" and {parts[-1]}" if len(parts) > 1 else "".join(parts)
    scene = SCENE_CLASSES[SCENE_NAMES[scene_label]] if 0 <= scene_label < len(SCENE_NAMES) else ""
    text = "a satellite image" + (f" with {surfaces}" if surfaces else "")
    return f"{text}; {scene}" if scene else text


def captions(labels: np.ndarray, masks: np.ndarray, classes: Mapping[str, str] = SURFACE_CLASSES) -> list[str]:
    """One caption per tile of a split (labels (N,), masks (N, H, W) of legend indices)."""
    return [caption(int(label), mask, classes) for label, mask in zip(labels, masks)]
