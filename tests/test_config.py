"""params.yaml handling: profiles, typed sections, and errors that name the key."""
from __future__ import annotations

from pathlib import Path

import pytest

from tasks.config import load_params, section
from tasks.errors import ParamsError
from tasks.prepare import DataConfig
from tasks.synth import SynthConfig


def test_tiny_profile_overrides_only_what_it_names(project: Path) -> None:
    params = load_params(project)
    assert params["synth"]["per_class"]["ms_train"] == 4
    assert params["synth"]["rgb_ambiguity"] == 0.3  # untouched by the profile
    assert "profiles" not in params


@pytest.mark.parametrize("edit, key", [
    ("rgb_ambiguity: 0.3", "synth.rgb_ambiguity"),
    ("source: synth ", "data.source"),
    ("profile: tiny", "profile"),
])
def test_bad_values_name_the_key(project: Path, edit: str, key: str) -> None:
    bad = {"rgb_ambiguity: 0.3": "rgb_ambiguity: 1.7", "source: synth ": "source: sentinel ",
           "profile: tiny": "profile: huge"}[edit]
    text = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(text.replace(edit, bad, 1))
    with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
        params = load_params(project)
        section(params, "synth", SynthConfig)
        section(params, "data", DataConfig)


def test_unknown_key_lists_valid_keys() -> None:
    with pytest.raises(ParamsError, match=r"synth\.rgb_ambiguty.*valid keys"):
        section({"synth": {"rgb_ambiguty": 0.5}}, "synth", SynthConfig)


def test_wrong_type_is_reported() -> None:
    with pytest.raises(ParamsError, match=r"synth\.noise.*expected a float"):
        section({"synth": {"noise": "lots"}}, "synth", SynthConfig)


def test_unknown_split_in_per_class() -> None:
    with pytest.raises(ParamsError, match=r"per_class\.train"):
        section({"synth": {"per_class": {"train": 3}}}, "synth", SynthConfig)
