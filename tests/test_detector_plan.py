"""What the detector stage compares: the variants each grid plans, and the params that choose them."""

from __future__ import annotations

import pytest
from helpers_params import repo_params

from ms2rgb.tasks.config import DETECTOR_VARIANTS
from ms2rgb.tasks.detection.plan import COMPARABLE, PIXEL_BASELINES, novel_classes, plan
from ms2rgb.tasks.errors import ParamsError

LEGEND = ["crop", "grass", "herb", "forest", "soil", "water", "asphalt", "concrete", "roof"]


def test_the_params_schema_and_the_plan_know_the_same_variants() -> None:
    assert sorted(COMPARABLE) == sorted(DETECTOR_VARIANTS)


def test_the_full_grid_plans_every_variant_once_and_the_method_at_every_k() -> None:
    settings = repo_params(detector__grid="full").detector
    variants = plan(settings, seed=3)
    names = [v.name for v in variants]
    assert len(names) == len(set(names))
    assert set(names) == set(DETECTOR_VARIANTS) | {f"full_k{k}" for k in settings.shots}
    k, seeds = max(settings.shots), tuple(range(3, 3 + settings.seeds))
    for v in variants:
        if v.name == "zero_shot":
            assert (v.shots, v.seeds) == (0, (3,))
        elif v.name.startswith("full_k") and v.shots != k:
            assert v.seeds == (3,)  # smaller K: the params seed only
        else:  # everything compared at the headline K, over the same seeds, the params seed first
            assert (v.shots, v.seeds) == (k, seeds), v
    assert [v.name for v in variants if v.hide_novel] == ["base_to_novel"]
    assert {v.kind for v in variants if v.name in PIXEL_BASELINES} == set(PIXEL_BASELINES)


def test_the_reduced_grid_keeps_zero_shot_and_the_method_and_only_what_it_names() -> None:
    settings = repo_params().detector
    names = {v.name for v in plan(settings, seed=0)}
    chosen = set(settings.grids[settings.grid])
    assert names == {"zero_shot", *chosen} | {f"full_k{k}" for k in settings.shots}
    assert "meta_net" not in names  # the default grid leaves the slowest CLIP baseline to `grid: full`


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"detector__grid": "huge"}, r"detector.*grid='huge' is not one of grids"),
        ({"detector__grids__reduced": ["unet", "random_forest"]}, r"grids.reduced names \['random_forest'\]"),
    ],
)
def test_a_bad_grid_names_the_key_and_the_valid_choices(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ParamsError, match=message):
        repo_params(**overrides)


def test_novel_classes_default_to_the_legends_second_half_and_must_leave_a_base() -> None:
    settings = repo_params().detector
    assert novel_classes(settings, LEGEND) == ["water", "asphalt", "concrete", "roof"]
    chosen = settings.model_copy(update={"novel_classes": ("roof",)})
    assert novel_classes(chosen, LEGEND) == ["roof"]
    for bad in (("rooftop",), tuple(LEGEND)):
        with pytest.raises(ParamsError, match="detector.novel_classes"):
            novel_classes(settings.model_copy(update={"novel_classes": bad}), LEGEND)
