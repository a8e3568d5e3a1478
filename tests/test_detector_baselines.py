"""Method B's baselines without CLIP (issue 23): the per-pixel forest, the U-Net, their shared scoring and config."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers_params import config, repo_params

from ms2rgb.models.bands import BandMismatchError
from ms2rgb.models.pixel_evidence import PixelGaussians, PixelMLP
from ms2rgb.models.unet import UNet, UNetConfig
from ms2rgb.tasks.config import DetectorConfig
from ms2rgb.tasks.data.classes import MASK_NODATA
from ms2rgb.tasks.detection.baselines import BASELINE_RUNNERS, run_baseline
from ms2rgb.tasks.detection.pixel_forest import (
    feature_names,
    fit_pixel_forest,
    pixel_features,
    predict_pixel_forest,
    sample_pixels,
)
from ms2rgb.tasks.detection.unet_baseline import build_unet, predict_unet, train_unet
from ms2rgb.tasks.errors import Ms2rgbError, ParamsError
from ms2rgb.tasks.training.memory import PeakMemory

CPU = torch.device("cpu")
NAMES = ["red", "green", "blue"]
PALETTE = np.array([[200, 40, 40], [40, 180, 60], [50, 60, 200]], dtype=np.float32)  # class -> RGB


def colour_tiles(n: int, seed: int, side: int = 32, block: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiles of `block`-px squares, each one class painted in its palette colour plus noise; a ring of
    255 (ignored) along the top rows of every mask."""
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, len(NAMES), (n, side // block, side // block))
    masks = cells.repeat(block, 1).repeat(block, 2).astype(np.uint8)  # (N, H, W)
    images = PALETTE[masks].transpose(0, 3, 1, 2) + rng.normal(0, 12, (n, 3, side, side))  # (N, 3, H, W)
    masks[:, :2] = MASK_NODATA
    return torch.from_numpy(images.clip(0, 255).astype(np.uint8)), torch.from_numpy(masks)


@pytest.fixture(scope="module")
def settings() -> DetectorConfig:
    return config("detector", "tiny")


@pytest.fixture(scope="module")
def tiles() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    return colour_tiles(6, seed=1), colour_tiles(3, seed=2)


# --- pixel forest ---------------------------------------------------------------------------------


def test_features_are_rgb_texture_and_gradient_per_pixel() -> None:
    images = torch.full((2, 3, 16, 16), 100, dtype=torch.uint8)
    images[1, 0, :, 8:] = 200  # a vertical edge in the red band of tile 1
    feats = pixel_features(images, (3, 5))
    assert feats.shape == (2 * 16 * 16, len(feature_names((3, 5)))) == (512, 16)
    flat = feats.reshape(2, 16, 16, -1)  # (N, H, W, F)
    names = feature_names((3, 5))
    means = [names.index(f"mean{w}_{b}") for w in (3, 5) for b in "rgb"]
    assert np.allclose(flat[0, ..., :3], 100) and np.allclose(flat[0][..., means], 100)
    std3 = flat[..., names.index("std3_r")]
    assert np.allclose(std3[0], 0, atol=1e-3)  # a flat tile has no texture, border windows included
    assert std3[1, 5, 8] > 40 and np.allclose(std3[1, 5, 2], 0, atol=1e-3)  # texture only at the edge
    assert flat[1, 5, 8, -1] > 0 and flat[0, 5, 8, -1] == 0  # gradient magnitude


def test_forest_separates_colour_coded_classes(tiles, settings: DetectorConfig) -> None:
    (images, masks), (test_images, test_masks) = tiles
    result = run_baseline("pixel_forest", (images, masks), (test_images, test_masks), NAMES, settings, 0, CPU, 2)
    assert result.scores["miou"] > 0.9 and set(result.scores["per_class_iou"]) == set(NAMES)
    assert result.preds.shape == test_masks.shape and result.preds.dtype == np.uint8
    assert result.trainable_params > len(NAMES) and result.losses == [] and result.train_seconds > 0
    assert result.scores["tiles_per_second"] > 0


def test_forest_never_trains_on_ignored_pixels(tiles, settings: DetectorConfig) -> None:
    (images, masks), _ = tiles
    rows = sample_pixels(masks, 10**9, seed=0)
    assert len(rows) == int((masks != MASK_NODATA).sum())
    capped = sample_pixels(masks, 500, seed=0)
    assert len(capped) == 500 and (masks.numpy().reshape(-1)[capped] != MASK_NODATA).all()
    forest = fit_pixel_forest(images, masks, settings.baselines.pixel_forest, seed=0, threads=1)
    assert forest.classes_.tolist() == [0, 1, 2]  # 255 is no class: never predicted
    with pytest.raises(Ms2rgbError, match="no labelled pixel"):
        sample_pixels(torch.full_like(masks, MASK_NODATA), 100, seed=0)


def test_forest_is_deterministic_for_a_seed_whatever_the_threads(tiles, settings: DetectorConfig) -> None:
    (images, masks), (test_images, _) = tiles
    cfg = settings.baselines.pixel_forest.model_copy(update={"max_pixels": 1000})
    windows = cfg.windows
    maps = [
        predict_pixel_forest(fit_pixel_forest(images, masks, cfg, seed, threads), test_images, windows, batch_size=2)
        for seed, threads in ((0, 1), (0, 2), (1, 2))
    ]
    assert np.array_equal(maps[0], maps[1])
    forests = [fit_pixel_forest(images, masks, cfg, seed, 1) for seed in (0, 1)]
    assert forests[0].estimators_[0].tree_.threshold.tolist() != forests[1].estimators_[0].tree_.threshold.tolist()


# --- U-Net ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth, side", [(1, 8), (2, 32), (3, 64)])
def test_unet_keeps_the_tile_side(depth: int, side: int) -> None:
    net = UNet(UNetConfig(n_classes=5, width=4, depth=depth))
    assert net(torch.randn(2, 3, side, side)).shape == (2, 5, side, side)
    assert net(torch.randn(1, 3, side, 2 * side)).shape == (1, 5, side, 2 * side)


def test_unet_rejects_bad_inputs_with_the_fix() -> None:
    net = UNet(UNetConfig(n_classes=2, width=4, depth=3))
    with pytest.raises(ValueError, match=r"multiple of 2\*\*depth = 8.*lower the U-Net depth"):
        net(torch.randn(1, 3, 20, 24))
    with pytest.raises(BandMismatchError, match=r"\(B, 3, H, W\)"):
        net(torch.randn(1, 4, 16, 16))
    with pytest.raises(ValueError, match="UNetConfig.depth=0"):
        UNetConfig(n_classes=2, depth=0)


def _train(tiles, settings: DetectorConfig, seed: int, steps: int) -> tuple[list[float], np.ndarray]:
    (images, masks), (test_images, _) = tiles
    cfg = settings.baselines.unet.model_copy(update={"steps": steps, "width": 8, "lr": 0.02})
    model = build_unet(len(NAMES), cfg, seed)
    losses = train_unet(model, images, masks, cfg, seed, CPU, settings.tune.focal_gamma)
    return losses, predict_unet(model, test_images, CPU, batch_size=2)


def test_unet_training_lowers_the_loss_and_is_deterministic_on_cpu(tiles, settings: DetectorConfig) -> None:
    losses, maps = _train(tiles, settings, seed=0, steps=12)
    assert len(losses) == 12 and np.mean(losses[-3:]) < 0.7 * losses[0]
    again, maps_again = _train(tiles, settings, seed=0, steps=12)
    assert again == losses and np.array_equal(maps, maps_again)
    other, _ = _train(tiles, settings, seed=1, steps=12)
    assert other != losses


def test_unet_result_is_a_run_of_the_detector_stage(tiles, settings: DetectorConfig) -> None:
    result = run_baseline("unet", *tiles, NAMES, settings, 0, CPU, 2)
    assert len(result.losses) == settings.baselines.unet.steps
    assert result.trainable_params == sum(p.numel() for p in build_unet(3, settings.baselines.unet, 0).parameters())
    run = result.as_run(7)
    cost = {"losses", "stopped_by", "steps", "train_seconds", "peak_memory_mb", "trainable_params"}
    assert cost | {"seed", "preds", "miou", "pixel_accuracy", "per_class_iou", "tiles_per_second"} <= set(run)
    assert run["seed"] == 7 and run["steps"] == settings.baselines.unet.steps and run["stopped_by"] == "max_steps"
    assert run["miou"] == result.scores["miou"] and run["preds"].shape == tiles[1][1].shape


def test_unknown_baseline_lists_the_valid_names(tiles, settings: DetectorConfig) -> None:
    with pytest.raises(Ms2rgbError, match=r"unknown baseline 'svm'.*\['max_likelihood', 'pixel_forest', 'pixel_mlp'"):
        run_baseline("svm", *tiles, NAMES, settings, 0, CPU, 2)
    assert set(BASELINE_RUNNERS) == {"pixel_forest", "unet", "max_likelihood", "pixel_mlp"}


def test_max_likelihood_is_the_pixel_evidence_alone(tiles, settings: DetectorConfig) -> None:
    result = run_baseline("max_likelihood", *tiles, NAMES, settings, 0, CPU, 2)
    evidence = PixelGaussians(settings.pixel_evidence.windows, 3).fit(*tiles[0])
    with torch.no_grad():
        expected = evidence(tiles[1][0]).argmax(dim=1).numpy()
    assert (result.preds == expected).all() and result.losses == [] and result.train_seconds >= 0
    assert result.trainable_params == sum(b.numel() for b in evidence.buffers())
    without = settings.model_copy(update={"pixel_evidence": None})
    with pytest.raises(ParamsError, match="detector.pixel_evidence"):
        run_baseline("max_likelihood", *tiles, NAMES, without, 0, CPU, 2)


def test_pixel_mlp_is_the_default_evidence_alone_and_repeats_for_a_seed(tiles, settings: DetectorConfig) -> None:
    cfg = settings.pixel_evidence
    result = run_baseline("pixel_mlp", *tiles, NAMES, settings, 3, CPU, 2)
    again = run_baseline("pixel_mlp", *tiles, NAMES, settings, 3, CPU, 2)
    evidence = PixelMLP(cfg.windows, 3, cfg.hidden).fit(*tiles[0], steps=cfg.steps, lr=cfg.lr, seed=3)
    with torch.no_grad():
        expected = evidence(tiles[1][0]).argmax(dim=1).numpy()
    assert (result.preds == expected).all() and (again.preds == result.preds).all()
    assert result.trainable_params == sum(p.numel() for p in evidence.parameters()) + sum(
        b.numel() for b in evidence.buffers()
    )


# --- cost and config --------------------------------------------------------------------------------


def test_peak_memory_sees_what_the_block_allocates_every_time() -> None:
    def allocate() -> None:
        chunks = [np.ones(32 * 1024) for _ in range(200)]  # 200 x 256 KB = 50 MB, on the C heap, touched
        del chunks

    peaks = []
    for _ in range(2):  # the second block reuses the first one's freed heap unless it was handed back
        with PeakMemory(CPU) as memory:
            allocate()
        peaks.append(memory.mb)
    if peaks[0] is None:
        pytest.skip("no resettable peak resident set on this OS")
    assert all(40 < mb < 150 for mb in peaks), peaks


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("pixel_forest__windows", [5, 4], r"detector\.baselines\.pixel_forest\.windows.*odd"),
        ("pixel_forest__trees", 0, r"detector\.baselines\.pixel_forest\.trees=0"),
        ("pixel_forest__max_depth", "deep", r"detector\.baselines\.pixel_forest\.max_depth='deep'"),
        ("unet__depth", 9, r"detector\.baselines\.unet\.depth=9"),
        ("unet__lr", 0, r"detector\.baselines\.unet\.lr=0"),
        ("unet__widht", 8, r"detector\.baselines\.unet\.widht.*valid keys here are \[.*'width'"),
    ],
)
def test_baseline_config_errors_name_the_key(key: str, value: object, message: str) -> None:
    with pytest.raises(ParamsError, match=message):
        repo_params(**{f"detector__baselines__{key}": value})
