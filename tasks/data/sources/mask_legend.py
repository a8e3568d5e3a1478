"""The legend of `ms2rgb data masks`: how a user's mask values map to class names.

    attribute: landcover       # vector labels: the property that holds the class (default "class")
    ignore: 255                # "no label": an id, a colour, or a list of them (default 255)
    classes:                   # in this order they become mask values 0, 1, ... of the written tiles
      water:  {description: open water, id: 1, colour: "#0000ff", value: Water}
      forest: {description: trees and forest canopy, id: 2, colour: [0, 128, 0], value: Forest}

A class gives whichever keys its masks need: `id` (class-id rasters), `colour` ("#rrggbb" or
[r, g, b]; colour-coded rasters) and `value` (the attribute value of vector labels; the class
name when absent). Every mistake is an error naming the file, the value and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ms2rgb.tasks.data.classes import MASK_NODATA
from ms2rgb.tasks.errors import DataError

Colour = tuple[int, int, int]
CLASS_KEYS = ("description", "id", "colour", "value")


class LegendError(DataError):
    """The legend yaml of `ms2rgb data masks` is missing, empty or has a bad entry."""


@dataclass(frozen=True)
class MaskLegend:
    """A parsed legend: classes in output order and how each input encoding maps onto them."""

    path: Path  # the yaml, named in every error
    classes: dict[str, str]  # name -> description; index = the mask value written
    ids: dict[int, int] = field(default_factory=dict)  # input id -> class index
    colours: dict[Colour, int] = field(default_factory=dict)  # input colour -> class index
    values: dict[str, int] = field(default_factory=dict)  # vector attribute value (as text) -> class index
    ignore_ids: frozenset[int] = frozenset({MASK_NODATA})
    ignore_colours: frozenset[Colour] = frozenset()
    attribute: str = "class"


def parse_colour(value: object, where: str, path: Path) -> Colour:
    """ "#00ff00" or [0, 255, 0] -> (0, 255, 0)."""
    if isinstance(value, str) and len(value) == 7 and value.startswith("#"):
        try:
            return (int(value[1:3], 16), int(value[3:5], 16), int(value[5:7], 16))
        except ValueError:
            pass
    if isinstance(value, list) and len(value) == 3 and all(type(v) is int and 0 <= v <= 255 for v in value):
        return (value[0], value[1], value[2])
    raise LegendError(path, f"{where} {value!r} is not a colour", 'write it as "#rrggbb" or [r, g, b] with 0..255')


def colour_text(colour: Colour) -> str:
    return "#{:02x}{:02x}{:02x}".format(*colour)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise LegendError(path, "no such legend file", "pass --legend a yaml file (format: docs/methods.md §B.8)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise LegendError(path, f"is not YAML ({err})".replace("\n", " "), "correct the syntax") from None
    if not isinstance(raw, dict):
        raise LegendError(path, f"holds {type(raw).__name__}", "give a mapping with a `classes` key")
    unknown = sorted(set(raw) - {"classes", "ignore", "attribute"})
    if unknown:
        raise LegendError(path, f"unknown key(s) {unknown}", "use only classes, ignore and attribute")
    return raw


def _ignores(raw: object, path: Path) -> tuple[frozenset[int], frozenset[Colour]]:
    """The ignore values: ids and colours. A list of three ints is one colour, as in a class entry."""
    is_colour = isinstance(raw, list) and len(raw) == 3 and all(isinstance(v, int) for v in raw)
    items = raw if isinstance(raw, list) and not is_colour else [raw]
    ids, colours = set(), set()
    for value in items:
        if isinstance(value, int) and not isinstance(value, bool):
            if not 0 <= value <= 255:
                raise LegendError(path, f"ignore {value!r} is not a uint8 mask value", "give ids in 0..255")
            ids.add(value)
        else:
            colours.add(parse_colour(value, "ignore", path))
    return frozenset(ids), frozenset(colours)


def read_mask_legend(path: Path) -> MaskLegend:
    """Parse and check the legend yaml (see the module docstring)."""
    raw = _read_yaml(path)
    entries = raw.get("classes") or {}
    if not isinstance(entries, dict) or not entries:
        raise LegendError(
            path, f"classes is {entries!r}: the legend is empty", "list at least one class: `classes: {water: {id: 1}}`"
        )
    if len(entries) >= MASK_NODATA:
        raise LegendError(path, f"{len(entries)} classes", f"give at most {MASK_NODATA - 1} (masks are uint8)")
    ignore_ids, ignore_colours = _ignores(raw.get("ignore", MASK_NODATA), path)
    legend = MaskLegend(
        path, {}, ignore_ids=ignore_ids, ignore_colours=ignore_colours, attribute=str(raw.get("attribute", "class"))
    )
    for index, (name, entry) in enumerate(entries.items()):
        _add_class(legend, index, str(name), entry if entry is not None else {})
    return legend


def _add_class(legend: MaskLegend, index: int, name: str, entry: object) -> None:
    path = legend.path
    if not isinstance(entry, dict) or set(entry) - set(CLASS_KEYS):
        raise LegendError(path, f"class {name!r} has {entry!r}", f"give a mapping with keys among {list(CLASS_KEYS)}")
    legend.classes[name] = str(entry.get("description") or name)
    if "id" in entry:
        value = entry["id"]
        # bool is an int in Python: `id: true` would silently be class id 1
        is_id = isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 255
        if not is_id or value in legend.ignore_ids or value in legend.ids:
            raise LegendError(path, f"class {name!r} id {value!r}", "give each class its own id in 0..255, not ignore")
        legend.ids[value] = index
    if "colour" in entry:
        colour = parse_colour(entry["colour"], f"class {name!r} colour", path)
        if colour in legend.colours or colour in legend.ignore_colours:
            raise LegendError(
                path, f"class {name!r} colour {colour_text(colour)} is used twice", "give distinct colours"
            )
        legend.colours[colour] = index
    value_text = str(entry.get("value", name))
    if value_text in legend.values:
        other = list(legend.classes)[legend.values[value_text]]
        raise LegendError(
            path,
            f"classes {other!r} and {name!r} share the vector value {value_text!r} (without `value`: the name)",
            "give each class its own `value`",
        )
    legend.values[value_text] = index
