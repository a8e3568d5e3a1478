"""The class set of a segmentation source's masks: `legend.json`, written beside its manifest.

A legend lists the classes in mask-value order (index = value; MASK_NODATA is "no label"), each with
the short description the detector's CLIP reads as its class text. Every segmentation source writes
one (synth: every surface; scenes: the surfaces the weak labels can give; folder: the user's
classes), prepare copies it into the prepared folder, and the detector, its captions, its report and
the saved model take their classes from it rather than from a table in the code.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ms2rgb.tasks.data.atomic import write_json_atomic
from ms2rgb.tasks.data.classes import MASK_NODATA, SURFACE_CLASSES, SURFACE_NAMES
from ms2rgb.tasks.data.weak_labels import WEAK_SURFACES
from ms2rgb.tasks.errors import DataError

LEGEND_FILE = "legend.json"
SYNTH_LEGEND: dict[str, str] = dict(SURFACE_CLASSES)  # the generator draws every surface
# Only what the spectral-index rules can claim: a class no mask ever holds would still be predicted.
WEAK_LEGEND: dict[str, str] = {name: SURFACE_CLASSES[name] for name in WEAK_SURFACES}


def surface_remap(classes: Mapping[str, str]) -> np.ndarray:
    """(256,) uint8 lookup: a SURFACE_NAMES mask value -> its index among `classes` (MASK_NODATA if absent)."""
    lut = np.full(256, MASK_NODATA, np.uint8)
    for index, name in enumerate(classes):
        lut[SURFACE_NAMES.index(name)] = index
    return lut


def write_legend(folder: Path, classes: Mapping[str, str]) -> Path:
    """<folder>/legend.json: {"ignore": 255, "classes": [{"name", "description"}, ...]} in mask-value order."""
    entries = [{"name": name, "description": text} for name, text in classes.items()]
    return write_json_atomic(folder / LEGEND_FILE, {"ignore": MASK_NODATA, "classes": entries})


def read_legend(folder: Path, missing: Mapping[str, str] | None = None) -> dict[str, str]:
    """Class name -> description in mask-value order, from <folder>/legend.json.

    Every source and prepare write one, so a folder without it is an error: silently taking the
    synthetic surfaces would train the detector on the wrong class set. `missing`: the classes of a
    folder that cannot have one (a manifest of a source that writes no legend), given by the caller."""
    path = folder / LEGEND_FILE
    if not path.is_file():
        if missing is not None:
            return dict(missing)
        raise DataError(
            path,
            "no legend: the folder was written before legends were, or by no segmentation source",
            "re-run prepare (for the folder source, first re-run `ms2rgb data masks`)",
        )
    try:
        entries = json.loads(path.read_text())["classes"]
        classes = {str(e["name"]): str(e["description"]) for e in entries}
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(path, f"is not a legend ({err})", "re-run prepare (or `ms2rgb data masks`)") from err
    if not classes or len(classes) != len(entries) or len(classes) >= MASK_NODATA:
        raise DataError(
            path,
            f"lists {len(entries)} classes ({len(classes)} distinct names)",
            f"a legend needs 1 to {MASK_NODATA - 1} classes with distinct names; re-run prepare",
        )
    return classes
