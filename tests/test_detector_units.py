"""Detector building blocks on the tiny random CLIP: stop rule, resume, determinism, captions, metrics, windows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_params import REPO, config
from helpers_rasters import recorded_reads, smooth_rgb, write_raster

from ms2rgb.models.clip_backbone import TINY_MODEL, load_clip
from ms2rgb.models.clip_detector import ClassMapDetector, ClipPixels
from ms2rgb.models.clip_prompt import PromptConfig, PromptedCLIP
from ms2rgb.tasks.data.cache import CachedSplit
from ms2rgb.tasks.data.classes import SURFACE_CLASSES, SURFACE_NAMES
from ms2rgb.tasks.data.windows import ImageReader, plan_blocks
from ms2rgb.tasks.detection.captions import caption, composition
from ms2rgb.tasks.detection.data import first_k_per_class
from ms2rgb.tasks.detection.detect import block_logits, resolve_classes, sliding_logits, window_starts
from ms2rgb.tasks.detection.pretrain import multi_positive_clip_loss, pretrain_clip
from ms2rgb.tasks.detection.tune import STOP_MAX_STEPS, STOP_THRESHOLD, latest_checkpoint, stop_reason, tune
from ms2rgb.tasks.errors import Ms2rgbError, UnknownClassError
from ms2rgb.tasks.training.metrics import confusion_matrix, iou_report

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def clip_and_tokenizer() -> tuple[torch.nn.Module, object]:
    torch.manual_seed(0)
    clip, tokenizer, _ = load_clip(TINY_MODEL, None)
    return clip, tokenizer


def make_detector(clip_and_tokenizer: tuple, mode: str = "coupled", seed: int = 0) -> ClassMapDetector:
    clip, tokenizer = clip_and_tokenizer
    torch.manual_seed(seed)
    prompted = PromptedCLIP(clip, PromptConfig(n_ctx=2, depth=2, similarity_layers=(2, 3), mode=mode))
    texts = list(SURFACE_CLASSES.values())
    return ClassMapDetector(prompted, tokenizer(texts), SURFACE_NAMES, texts, TINY_MODEL)


@pytest.fixture(scope="module")
def tiles() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (6, 3, 64, 64), generator=gen, dtype=torch.uint8)
    masks = torch.randint(0, len(SURFACE_NAMES), (6, 64, 64), generator=gen, dtype=torch.uint8)
    masks[:, :4] = 255  # no-data rows count nowhere
    return images, masks


# ---------------------------------------------------------------- stop rule, resume, determinism


def test_stop_rule_needs_patience_steps_under_threshold() -> None:
    cfg = config("detector.tune", max_steps=10, loss_threshold=1.0, patience=3)
    assert stop_reason([0.5, 0.5], cfg) is None
    assert stop_reason([0.5, 2.0, 0.5, 0.5], cfg) is None  # one step above the line resets the count
    assert stop_reason([2.0, 0.5, 0.5, 0.5], cfg) == STOP_THRESHOLD
    assert stop_reason([2.0] * 10, cfg) == STOP_MAX_STEPS


def test_tune_ends_by_threshold_or_max_steps(clip_and_tokenizer: tuple, tiles: tuple) -> None:
    easy = tune(
        make_detector(clip_and_tokenizer),
        *tiles,
        config("detector.tune", max_steps=6, batch_size=2, loss_threshold=1e3, patience=2),
        0,
        CPU,
    )
    assert easy.stopped_by == STOP_THRESHOLD and len(easy.losses) == 2
    hard = tune(
        make_detector(clip_and_tokenizer),
        *tiles,
        config("detector.tune", max_steps=3, batch_size=2, loss_threshold=0.0),
        0,
        CPU,
    )
    assert hard.stopped_by == STOP_MAX_STEPS and len(hard.losses) == 3


def test_tune_moves_prompts_only_and_is_deterministic(clip_and_tokenizer: tuple, tiles: tuple) -> None:
    cfg = config("detector.tune", max_steps=2, batch_size=3, loss_threshold=0.0)
    frozen = {k: v.clone() for k, v in clip_and_tokenizer[0].state_dict().items()}
    a, b = make_detector(clip_and_tokenizer), make_detector(clip_and_tokenizer)
    start = {k: v.clone() for k, v in a.prompted.prompt_state_dict().items()}
    run_a, run_b = tune(a, *tiles, cfg, 7, CPU), tune(b, *tiles, cfg, 7, CPU)
    assert run_a.losses == run_b.losses
    for key, value in a.prompted.prompt_state_dict().items():
        assert torch.equal(value, b.prompted.prompt_state_dict()[key])
        assert not torch.equal(value, start[key]), f"{key} did not train"
    for key, value in clip_and_tokenizer[0].state_dict().items():
        assert torch.equal(value, frozen[key]), f"frozen CLIP tensor {key} changed"


def test_resume_from_checkpoint_reproduces_uninterrupted_run(
    clip_and_tokenizer: tuple, tiles: tuple, tmp_path: Path
) -> None:
    cfg = config("detector.tune", max_steps=4, batch_size=2, loss_threshold=0.0, checkpoint_every=2)
    straight = make_detector(clip_and_tokenizer)
    full = tune(straight, *tiles, cfg, 1, CPU, checkpoint_dir=tmp_path / "a")
    # older step checkpoints go once a newer one (here the final one) is whole
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["last.pt"]
    assert latest_checkpoint(tmp_path / "a") == tmp_path / "a" / "last.pt"

    def killed_at_step_3(step: int, loss: float) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tune(make_detector(clip_and_tokenizer), *tiles, cfg, 1, CPU, tmp_path / "b", on_step=killed_at_step_3)
    assert latest_checkpoint(tmp_path / "b") == tmp_path / "b" / "step00002.pt"
    assert latest_checkpoint(tmp_path / "none") is None
    resumed = make_detector(clip_and_tokenizer, seed=99)  # other init: the checkpoint must overwrite it
    rest = tune(resumed, *tiles, cfg, 123, CPU, resume_from=latest_checkpoint(tmp_path / "b"))
    assert rest.losses == full.losses
    for key, value in straight.prompted.prompt_state_dict().items():
        assert torch.equal(value, resumed.prompted.prompt_state_dict()[key]), key


def test_checkpoint_of_another_mode_is_refused(clip_and_tokenizer: tuple, tiles: tuple, tmp_path: Path) -> None:
    tune(
        make_detector(clip_and_tokenizer, "text"),
        *tiles,
        config("detector.tune", max_steps=1, batch_size=2),
        0,
        CPU,
        checkpoint_dir=tmp_path,
    )
    with pytest.raises(Ms2rgbError, match="another prompt mode"):
        tune(
            make_detector(clip_and_tokenizer, "coupled"),
            *tiles,
            config("detector.tune", max_steps=2, batch_size=2),
            0,
            CPU,
            resume_from=tmp_path / "last.pt",
        )


def test_zero_shot_has_nothing_to_tune(clip_and_tokenizer: tuple, tiles: tuple) -> None:
    with pytest.raises(Ms2rgbError, match="nothing to train"):
        tune(make_detector(clip_and_tokenizer, "zero_shot"), *tiles, config("detector.tune"), 0, CPU)


# ---------------------------------------------------------------- pixels, pretraining loss


def test_pixels_scale_uint8_to_clip_statistics(clip_and_tokenizer: tuple) -> None:
    pixels = ClipPixels.for_clip(clip_and_tokenizer[0])
    mean = torch.tensor(clip_and_tokenizer[0].visual.preprocess_cfg["mean"]) * 255
    out = pixels(mean.view(1, 3, 1, 1).expand(1, 3, 64, 64))
    torch.testing.assert_close(out, torch.zeros(1, 3, 64, 64), atol=1e-5, rtol=0)
    assert ClipPixels([0.5] * 3, [0.5] * 3, (32, 32))(torch.zeros(2, 3, 64, 64)).shape == (2, 3, 32, 32)


def test_multi_positive_loss_counts_duplicate_captions_as_positives() -> None:
    image = torch.eye(3)[[0, 0, 1]]  # tiles 0 and 1 share caption 0
    text = torch.eye(3)[:2]
    caption_of = torch.tensor([0, 0, 1])
    right = multi_positive_clip_loss(image, text, torch.tensor(50.0), caption_of)
    wrong = multi_positive_clip_loss(image, text, torch.tensor(50.0), torch.tensor([1, 1, 0]))
    assert wrong > 10
    # Images find their caption (0); text 0 spreads over its two equal tiles: the entropy ln 2 of
    # its target, averaged over 2 texts and halved by the symmetric mean.
    assert right.item() == pytest.approx(0.25 * np.log(2), abs=1e-4)


def test_fallback_pretraining_is_seeded_and_trains_every_clip_tensor(tiles: tuple) -> None:
    images, masks = tiles
    split = CachedSplit(
        images=images.numpy(),
        labels=np.array([0, 1, 2, 8, 9, 9]),
        ids=[str(i) for i in range(6)],
        location_ids=[str(i) for i in range(6)],
        masks=masks.numpy(),
    )
    cfg = config("detector.pretrain", steps=2, batch_size=4, warmup_steps=1)
    states, losses = [], []
    for _ in range(2):
        torch.manual_seed(0)
        clip, tokenizer, _ = load_clip(TINY_MODEL, None)
        start = {k: v.clone() for k, v in clip.state_dict().items()}
        losses.append(pretrain_clip(clip, tokenizer, split, cfg, 5, CPU, progress=lambda _: None))
        states.append(clip.state_dict())
    assert losses[0] == losses[1] and len(losses[0]) == 2
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key
    assert not torch.equal(states[0]["visual.proj"], start["visual.proj"])
    assert not torch.equal(states[0]["text_projection"], start["text_projection"])


def shot_split(labels: list[int], locations: list[str]) -> CachedSplit:
    n = len(labels)
    return CachedSplit(
        images=np.zeros((n, 3, 4, 4), np.uint8),
        labels=np.array(labels),
        ids=[f"t{i}" for i in range(n)],
        location_ids=locations,
        masks=None,
    )


def test_shots_are_spread_over_images_before_a_second_tile_of_one_image_is_taken() -> None:
    # class 0: three tiles of image a, then one each of b and c; class 1: two of image a, one of d
    split = shot_split([0, 0, 0, 1, 1, 0, 0, 1], ["a", "a", "a", "a", "a", "b", "c", "d"])
    assert first_k_per_class(split, 2).tolist() == [0, 3, 5, 7]  # cache order alone: [0, 1, 3, 4]
    assert first_k_per_class(split, 3).tolist() == [0, 3, 4, 5, 6, 7]


def test_shots_of_tiles_that_are_each_their_own_location_keep_cache_order() -> None:
    labels = [2, 0, 1, 0, 2, 1, 0]
    split = shot_split(labels, [f"loc{i}" for i in range(len(labels))])
    assert first_k_per_class(split, 2).tolist() == [0, 1, 2, 3, 4, 5]


# ---------------------------------------------------------------- captions and metrics


def test_caption_lists_surfaces_by_share_with_their_descriptions() -> None:
    mask = np.full((10, 10), SURFACE_NAMES.index("water"), np.uint8)
    mask[:3] = SURFACE_NAMES.index("grass")
    mask[9, :2] = SURFACE_NAMES.index("roof")  # 2 % share: too small to mention
    mask[9, 2] = 255
    assert [n for n, _ in composition(mask)] == ["water", "grass", "roof"]
    text = caption(9, mask)  # SeaLake
    assert text.startswith(
        f"a satellite image with mostly {SURFACE_CLASSES['water']} and some {SURFACE_CLASSES['grass']};"
    )
    assert "roof" not in text and text.endswith("open water of a sea or lake")


def test_iou_report_on_a_constructed_case() -> None:
    target = np.array([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 1, 0]])
    conf = confusion_matrix(target, pred, 4, ignore_index=255)
    assert conf.sum() == 6  # no-data pixels ignored
    report = iou_report(conf, ["a", "b", "c", "d"])
    # a: 1 / (2 + 2 - 1) ; b: 2 / (3 + 2 - 2) ; c: 1 / (1 + 2 - 1); d never true nor predicted
    assert report["per_class_iou"] == {"a": round(1 / 3, 4), "b": round(2 / 3, 4), "c": 0.5}
    assert report["miou"] == pytest.approx((1 / 3 + 2 / 3 + 0.5) / 3)
    assert report["pixel_accuracy"] == pytest.approx(4 / 6)


# ---------------------------------------------------------------- detect helpers


def test_resolve_classes_accepts_surfaces_scenes_and_descriptions() -> None:
    names, texts = resolve_classes(" water, River ,red tiled roofs,SeaLake")
    assert names == ["water", "River", "red tiled roofs", "SeaLake"]
    assert texts == [
        SURFACE_CLASSES["water"],
        "a river winding through land",
        "red tiled roofs",
        "open water of a sea or lake",
    ]
    assert resolve_classes("Forest")[1] == [SURFACE_CLASSES["forest"]]  # surfaces win: the detector maps them


def test_resolve_classes_knows_the_detectors_own_legend_first() -> None:
    # A detector tuned on a user's legend: its one-word class names resolve to its own descriptions,
    # and its description of a built-in name wins over the built-in one.
    own = {"pond": "small fish ponds", "water": "muddy river water"}
    names, texts = resolve_classes("pond, water, forest", own)
    assert names == ["pond", "water", "forest"]
    assert texts == ["small fish ponds", "muddy river water", SURFACE_CLASSES["forest"]]
    with pytest.raises(UnknownClassError, match=r"'pond'"):
        resolve_classes("pond")  # without the legend it is unknown


@pytest.mark.parametrize(
    "spec, error, match",
    [
        ("", Ms2rgbError, "names no class"),
        (" , ,", Ms2rgbError, "names no class"),
        ("water,zebra", UnknownClassError, r"'zebra'.*valid classes are \['crop'"),
        ("water,Water", Ms2rgbError, "more than once"),
    ],
)
def test_resolve_classes_errors(spec: str, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        resolve_classes(spec)


def test_window_starts_cover_the_image_flush() -> None:
    assert window_starts(64, 64, 32) == [0]
    assert window_starts(40, 64, 32) == [0]
    assert window_starts(150, 64, 32) == [0, 32, 64, 86]
    assert window_starts(128, 64, 64) == [0, 64]


def test_sliding_logits_average_overlapping_windows() -> None:
    calls = []

    def score(tiles: torch.Tensor) -> torch.Tensor:  # logit of class 0 = the window's corner pixel value
        calls.append(len(tiles))
        corner = tiles[:, 0, :1, :1].float()  # (B, 1, 1)
        return torch.stack([corner.expand(-1, 64, 64), torch.zeros(len(tiles), 64, 64)], dim=1)

    rgb = np.zeros((3, 96, 70), np.uint8)
    rgb[0, 32, 0] = 8  # corner of the window starting at row 32, col 0
    logits = sliding_logits(score, rgb, 2, 32, 4, CPU)
    assert logits.shape == (2, 96, 70) and calls == [4]  # windows at rows 0/32 x cols 0/6, one batch
    # (40, 3) lies in the windows at (0, 0) (corner 0) and (32, 0) (corner 8): their mean
    assert logits[0, 40, 3] == pytest.approx(4.0) and logits[0, 10, 3] == 0.0 and logits[0, 80, 3] == 8.0
    small = sliding_logits(score, np.full((3, 20, 30), 5, np.uint8), 2, 32, 4, CPU)
    assert small.shape == (2, 20, 30) and np.all(small[0] == 5)  # edge-padded to one window, cropped back


# ---------------------------------------------------------------- windowed detect


def content_score(tiles: torch.Tensor) -> torch.Tensor:
    """Class 0: red plus the window's corner green (so the window mean matters); class 1: blue."""
    x = tiles.float()
    return torch.stack([x[:, 0] + x[:, 1, :1, :1], x[:, 2]], dim=1)


@pytest.mark.parametrize("budget, stride", [(190 * 190, 32), (200 * 230, 20), (10**7, 32)])
def test_block_logits_equal_the_whole_image_within_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, budget: int, stride: int
) -> None:
    rgb = smooth_rgb(300, 230, seed=4)
    image = write_raster(tmp_path / "img.tif", rgb)
    whole = sliding_logits(content_score, rgb, 2, stride, 16, CPU)
    got = np.full_like(whole, np.nan)
    with recorded_reads(monkeypatch) as calls, ImageReader(image) as reader:
        for block in plan_blocks(300, 230, budget, halo=63, align=64):
            logits, block_rgb, valid = block_logits(content_score, reader, block, 2, stride, 16, CPU)
            r, c, h, w = int(block.row_off), int(block.col_off), int(block.height), int(block.width)
            assert np.array_equal(block_rgb, rgb[:, r : r + h, c : c + w]) and valid.all()
            got[:, r : r + h, c : c + w] = logits
    assert max(rows * cols for _, rows, cols in calls) <= budget
    assert (sum(name == "read" for name, _, _ in calls) > 1) == (budget < 300 * 230)  # one read when it fits
    np.testing.assert_allclose(got, whole, rtol=1e-6)


def test_detect_reads_by_windows_and_writes_the_same_map(
    clip_and_tokenizer: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import rasterio

    from ms2rgb.tasks.detection import detect as detect_module

    detector = make_detector(clip_and_tokenizer)
    monkeypatch.setattr(detect_module, "choose_detector", lambda root, uri: (detector, "test detector", None))
    image = write_raster(tmp_path / "scene.tif", smooth_rgb(300, 260, seed=5))
    whole = detect_module.detect(image, "water,forest,roof", tmp_path / "whole", root=tmp_path)
    budget = 190 * 190
    with recorded_reads(monkeypatch) as calls:
        windowed = detect_module.detect(
            image, "water,forest,roof", tmp_path / "windowed", root=tmp_path, window_px=budget
        )
    assert max(rows * cols for _, rows, cols in calls) <= budget < 300 * 260
    assert whole["reads"] == 1 and windowed["reads"] > 1 and windowed["largest_read_px"] <= budget
    with (
        rasterio.open(whole["outputs"]["classes.tif"]) as a,
        rasterio.open(windowed["outputs"]["classes.tif"]) as b,
        rasterio.open(image) as src,
    ):
        assert (b.crs, b.transform, b.height, b.width) == (src.crs, src.transform, src.height, src.width)
        assert np.array_equal(a.read(), b.read()) and b.colormap(1)[0] != b.colormap(1)[1]
    assert whole["shares"] == windowed["shares"] and windowed["polygons"] >= whole["polygons"] > 0
    assert Path(windowed["outputs"]["overlay.png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_detect_uses_the_champion_and_the_artifacts_only_without_a_store(
    clip_and_tokenizer: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import yaml

    from ms2rgb.tasks import tracking
    from ms2rgb.tasks.detection.detect import choose_detector

    # the real loader first: this project has no MLflow store, and no artifacts either
    with pytest.raises(Ms2rgbError, match=r"no detector: no MLflow store .*detector.pt does not exist") as caught:
        choose_detector(tmp_path, None)
    assert "\n" not in str(caught.value)
    tracking.configure(tmp_path, "ms2rgb")  # now there is a store: the champion it must hold is used
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["tracking"]["model_prefix"] = "team-b"  # the project's own registered detector, not ms2rgb's
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    detector = make_detector(clip_and_tokenizer)
    asked: list[str] = []
    monkeypatch.setattr(tracking, "load_registered_module", lambda root, uri: asked.append(uri) or detector)
    assert choose_detector(tmp_path, None) == (detector, "models:/team-b-detector@champion", None)
    assert asked == ["models:/team-b-detector@champion"]
