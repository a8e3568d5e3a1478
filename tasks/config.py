"""params.yaml -> typed configs. Unknown keys and bad values raise ParamsError naming the key."""
from __future__ import annotations

import copy
import dataclasses
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from tasks.errors import ParamsError

PARAMS_FILE = "params.yaml"
T = TypeVar("T")


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "per_class":
            out[key] = _merge(out[key], value)
        else:  # per_class is replaced whole: a profile lists exactly the splits it wants
            out[key] = copy.deepcopy(value)
    return out


def load_params(root: Path) -> dict[str, Any]:
    """Read <root>/params.yaml and apply the selected profile's overrides."""
    path = root / PARAMS_FILE
    if not path.exists():
        raise ParamsError(str(path), None, "run from the project root, or copy params.yaml there")
    raw = yaml.safe_load(path.read_text()) or {}
    profile = raw.get("profile", "default")
    profiles = raw.get("profiles", {}) or {}
    if profile not in profiles:
        raise ParamsError("profile", profile, f"choose one of {sorted(profiles)}")
    return _merge({k: v for k, v in raw.items() if k != "profiles"}, profiles[profile] or {})


def _check_type(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not isinstance(value, hint) or (
            hint is int and isinstance(value, bool)):
        raise ParamsError(key, value, f"expected a {hint.__name__}")
    if origin is dict and not isinstance(value, dict):
        raise ParamsError(key, value, "expected a mapping")
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    return value


def section(params: dict[str, Any], name: str, cls: type[T], **extra: Any) -> T:
    """Build dataclass `cls` from params[name]; `extra` fills fields that live elsewhere (e.g. seed)."""
    values = dict(params.get(name) or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ParamsError(f"{name}.{unknown[0]}", values[unknown[0]], f"valid keys are {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    checked = {k: _check_type(f"{name}.{k}", v, hints[k]) for k, v in values.items()}
    config = cls(**{**checked, **extra})
    check = getattr(config, "check", None)
    if check is not None:
        check(name)
    return config


def require_range(key: str, value: float, low: float, high: float) -> None:
    """Raise ParamsError unless low <= value <= high."""
    if not low <= value <= high:
        raise ParamsError(key, value, f"must lie in [{low}, {high}]")
