"""params.yaml handling: profiles, typed sections, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from ms2rgb.tasks.config import SynthConfig, load_params
from ms2rgb.tasks.errors import ParamsError, ParamsFileError


def test_tiny_profile_overrides_only_what_it_names(project: Path) -> None:
    params = load_params(project)
    assert params.synth.per_class["ms_train"] == 4
    assert params.synth.rgb_ambiguity == 0.3  # untouched by the profile
    assert params.profile == "tiny"


@pytest.mark.parametrize(
    "edit, key",
    [
        ("rgb_ambiguity: 0.3", "synth.rgb_ambiguity"),
        ("source: synth ", "data.source"),
        ("profile: tiny", "profile"),
    ],
)
def test_bad_values_name_the_key(project: Path, edit: str, key: str) -> None:
    bad = {
        "rgb_ambiguity: 0.3": "rgb_ambiguity: 1.7",
        "source: synth ": "source: sentinel ",
        "profile: tiny": "profile: huge",
    }[edit]
    text = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(text.replace(edit, bad, 1))
    with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
        load_params(project)


def _with(project: Path, old: str, new: str) -> None:
    text = (project / "params.yaml").read_text()
    assert old in text
    (project / "params.yaml").write_text(text.replace(old, new, 1))


def test_unknown_key_lists_valid_keys(project: Path) -> None:
    _with(project, "  rgb_ambiguity: 0.3", "  rgb_ambiguty: 0.3")
    with pytest.raises(ParamsError, match=r"synth\.rgb_ambiguty.*valid keys here are \[.*'rgb_ambiguity'"):
        load_params(project)


def test_wrong_type_is_reported(project: Path) -> None:
    _with(project, "  noise: 0.02", "  noise: lots")
    with pytest.raises(ParamsError, match=r"synth\.noise='lots'.*valid number"):
        load_params(project)


def test_unknown_split_in_per_class(project: Path) -> None:
    _with(project, "    ms_train: 60", "    train: 60")
    with pytest.raises(ParamsError, match=r"per_class.*\['train'\]"):
        load_params(project)


@pytest.mark.parametrize(
    "old, new, key",
    [
        ("  logit_scale: 14.2857", "  logit_scale: abc", "detector.prompt.logit_scale='abc'"),
        ("  eurosat_rgb_dir: null", "  eurosat_rgb_dir: 3", "data.eurosat_rgb_dir=3"),
        ("    model: ms2rgb-tiny-vit", "    model: no-such-model", "detector.clip.model='no-such-model'"),
        (
            "student: {steps: 6, batch_size: 16, heads: 2,",
            "student: {steps: 6, batch_size: 16, heads: 3,",
            "student.heads=3",
        ),
        ("  augment: true            # random flips", "  augment: 1            # random flips", "teacher.augment=1"),
    ],
)
def test_every_field_is_checked_optional_and_cross_field_ones_too(project: Path, old: str, new: str, key: str) -> None:
    _with(project, old, new)
    with pytest.raises(ParamsError, match=key.replace(".", r"\.").replace("(", r"\(")):
        load_params(project)


def test_an_invalid_base_value_is_an_error_even_under_a_profile_override(project: Path) -> None:
    _with(project, "  steps: 150 ", "  steps: -1 ")  # the tiny profile sets teacher.steps itself
    with pytest.raises(ParamsError, match=r"teacher\.steps=-1"):
        load_params(project)


def test_a_bad_unselected_profile_is_reported_with_its_name(project: Path) -> None:
    _with(project, "  default: {}", "  default: {teacher: {width: 2}}")
    with pytest.raises(ParamsError, match=r"profiles\.default: teacher\.width=2"):
        load_params(project)


def test_yaml_syntax_error_names_file_line_and_column(project: Path) -> None:
    text = (project / "params.yaml").read_text().splitlines()
    line = next(i for i, t in enumerate(text) if t.startswith("seed:"))
    text[line] = "seed: 0: oops"
    (project / "params.yaml").write_text("\n".join(text) + "\n")
    with pytest.raises(ParamsFileError, match=r"params\.yaml:\d+:\d+: YAML syntax error") as err:
        load_params(project)
    reported = int(str(err.value).split("params.yaml:")[1].split(":")[0])
    assert reported == line + 1  # 1-based


def test_config_models_carry_no_defaults() -> None:
    """params.yaml is the only home of defaults: no field of any section may have one."""
    from pydantic import BaseModel

    from ms2rgb.tasks import config

    sections = [
        c
        for c in vars(config).values()
        if isinstance(c, type) and issubclass(c, BaseModel) and c.__module__ == config.__name__
    ]
    assert len(sections) >= 12
    defaulted = [f"{c.__name__}.{name}" for c in sections for name, f in c.model_fields.items() if not f.is_required()]
    assert defaulted == []
    assert SynthConfig.model_fields["crs"].is_required()
