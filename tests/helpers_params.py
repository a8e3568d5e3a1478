"""Typed configs for tests, built from the repository's params.yaml (the one home of defaults)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ms2rgb.tasks.config import Params, merged_params, parse_params, read_params_file

REPO = Path(__file__).resolve().parents[1]


def repo_params(profile: str = "default", **overrides: Any) -> Params:
    """params.yaml of the repository with `profile` selected and dotted overrides applied, checked
    as the pipeline checks it (so a bad override raises ParamsError naming the key)."""
    raw = merged_params({**read_params_file(REPO / "params.yaml"), "profile": profile})
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split("__")
        node = raw
        for part in parents:
            node = node[part]
        node[leaf] = value
    return parse_params(raw)


def config(section: str, profile: str = "default", **overrides: Any) -> Any:
    """One (dotted) section, e.g. config("detector.tune", max_steps=3), checked with the overrides."""
    prefix = section.replace(".", "__")
    node: Any = repo_params(profile, **{f"{prefix}__{k}": v for k, v in overrides.items()})
    for part in section.split("."):
        node = getattr(node, {"validate": "validation", "evaluate": "evaluation"}.get(part, part))
    return node
