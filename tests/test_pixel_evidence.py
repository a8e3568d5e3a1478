"""The detector's per-pixel evidence: Gaussians or a pixel MLP fitted on the shots, their place in the map, tuning
and resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers_params import config

from ms2rgb.models.clip_backbone import TINY_MODEL, load_clip
from ms2rgb.models.clip_detector import ClassMapDetector
from ms2rgb.models.clip_prompt import PromptConfig, PromptedCLIP
from ms2rgb.models.pixel_evidence import PixelGaussians, PixelMLP, box_mean
from ms2rgb.tasks.detection.evidence_weight import WEIGHTS, cross_fitted_weight
from ms2rgb.tasks.detection.model import detector_from_state, evidence_payload
from ms2rgb.tasks.detection.tune import tune
from ms2rgb.tasks.training.augment import dihedral

CPU = torch.device("cpu")
COLOURS = torch.tensor([[200, 40, 40], [40, 200, 40], [40, 40, 200]], dtype=torch.float32)  # red, green, blue


def painted(labels: torch.Tensor, seed: int, noise_std: float = 12.0) -> torch.Tensor:
    """uint8 RGB tiles (N, 3, H, W) whose pixels have their label's colour plus noise."""
    noise = torch.randn(labels.shape[0], 3, *labels.shape[1:], generator=torch.Generator().manual_seed(seed))
    noise = noise * noise_std
    rgb = COLOURS[labels.long()].permute(0, 3, 1, 2) + noise
    return rgb.clamp(0, 255).to(torch.uint8)


def stripes(n: int, classes: int = 3) -> torch.Tensor:
    """(n, 32, 32) masks of vertical stripes cycling through the classes, shifted per tile."""
    columns = (torch.arange(32) // 4).view(1, 1, 32) + torch.arange(n).view(n, 1, 1)
    return (columns % classes).expand(n, 32, 32).to(torch.uint8)


@pytest.mark.parametrize("side", [1, 5, 17])
def test_box_mean_is_the_mean_over_each_windows_pixels_inside_the_tile(side: int) -> None:
    x = torch.rand(2, 3, 20, 23, generator=torch.Generator().manual_seed(side)) * 255
    half = side // 2
    for r, c in [(0, 0), (7, 11), (19, 22), (3, 20)]:  # corners, the middle, near an edge
        window = x[:, :, max(0, r - half) : r + half + 1, max(0, c - half) : c + half + 1]
        torch.testing.assert_close(box_mean(x, side)[:, :, r, c], window.mean(dim=(2, 3)), rtol=1e-5, atol=1e-4)


def test_fitted_gaussians_tell_the_colours_apart_on_new_tiles() -> None:
    masks = stripes(4)
    evidence = PixelGaussians([5], 3).fit(painted(masks, 0), masks)
    test = stripes(3)
    test = test.roll(2, dims=2)
    pred = evidence(painted(test, 1)).argmax(dim=1)
    assert (pred == test.long()).float().mean() > 0.95


def test_a_class_without_shots_is_never_ruled_out_by_the_pixels() -> None:
    masks = stripes(4, classes=2)  # class 2 never labelled
    evidence = PixelGaussians([5], 3).fit(painted(masks, 0), masks)
    assert evidence.known.tolist() == [True, True, False]
    loglik = evidence(painted(stripes(2), 1))
    torch.testing.assert_close(loglik[:, 2], loglik[:, :2].max(dim=1).values)


def test_unlabelled_pixels_are_ignored_and_all_unlabelled_is_refused() -> None:
    masks = stripes(4)
    noisy = masks.clone()
    noisy[:, :, :8] = 255  # the same pixels, now unlabelled, painted in a fourth colour
    images = painted(masks, 0)
    images[:, :, :, :8] = 255
    clean_fit = PixelGaussians([5], 3).fit(images[:, :, :, 8:], masks[:, :, 8:])
    masked_fit = PixelGaussians([5], 3).fit(images, noisy)
    assert masked_fit.known.all()
    assert (masked_fit.means - clean_fit.means).abs().max() < 0.5  # the white band does not move the classes
    with pytest.raises(ValueError, match="no labelled pixel"):
        PixelGaussians([5], 3).fit(images, torch.full_like(masks, 255))


def test_evidence_turns_with_the_tile() -> None:
    """Tuning computes the evidence once and turns it with each augmented tile: that is only right
    if the features are the same whichever way the tile lies (square windows)."""
    masks = stripes(2)
    images = painted(masks, 0)
    evidence = PixelGaussians([5, 9], 3).fit(images, masks)
    for k in range(8):
        torch.testing.assert_close(evidence(dihedral(images, k)), dihedral(evidence(images), k), atol=1e-3, rtol=1e-4)


def test_the_pixel_mlp_learns_a_class_no_single_gaussian_fits() -> None:
    # Class 0 is red *or* blue, class 1 green: one Gaussian per class puts class 0's mean on purple.
    masks = stripes(6, classes=3)
    images = painted(masks, 0, noise_std=8.0)
    two_class = torch.where(masks == 2, torch.zeros_like(masks), masks)  # blue stripes labelled 0 as well
    mlp = PixelMLP([5], 2, hidden=32).fit(images, two_class, steps=300, seed=0)
    test = stripes(3)
    truth = torch.where(test == 2, torch.zeros_like(test), test)
    with torch.no_grad():
        accuracy = (mlp(painted(test, 1, noise_std=8.0)).argmax(1) == truth).float().mean().item()
    assert accuracy > 0.95
    assert all(not p.requires_grad for p in mlp.parameters()), "a fitted expert must stay frozen during tuning"


def test_the_pixel_mlp_repeats_for_a_seed_and_gives_unseen_classes_the_best_known_score() -> None:
    masks = stripes(4)
    images = painted(masks, 0)
    first = PixelMLP([5], 4, hidden=16).fit(images, masks, steps=30, seed=7)
    second = PixelMLP([5], 4, hidden=16).fit(images, masks, steps=30, seed=7)
    other = PixelMLP([5], 4, hidden=16).fit(images, masks, steps=30, seed=8)
    with torch.no_grad():
        scores = first(images[:2])
        torch.testing.assert_close(scores, second(images[:2]), rtol=0, atol=0)
        assert not torch.equal(scores, other(images[:2]))
    assert first.known.tolist() == [True, True, True, False]
    torch.testing.assert_close(scores[:, 3], scores[:, :3].max(dim=1).values)
    assert torch.allclose(scores[:, :3].exp().sum(dim=1), torch.ones(1))  # probabilities over the known classes


@pytest.fixture(scope="module")
def clip_and_tokenizer() -> tuple[torch.nn.Module, object]:
    torch.manual_seed(0)
    clip, tokenizer, _ = load_clip(TINY_MODEL, None)
    return clip, tokenizer


def detector_with_evidence(
    clip_and_tokenizer: tuple, images: torch.Tensor, masks: torch.Tensor, kind: str = "gaussian"
) -> ClassMapDetector:
    clip, tokenizer = clip_and_tokenizer
    torch.manual_seed(0)
    prompted = PromptedCLIP(clip, PromptConfig(n_ctx=2, depth=2, similarity_layers=(2, 3), mode="coupled"))
    texts = ["red tiled roofs", "green grass", "blue water"]
    mlp = PixelMLP([5], 3, hidden=8)
    evidence = PixelGaussians([5], 3).fit(images, masks) if kind == "gaussian" else mlp.fit(images, masks, steps=5)
    names, tokens = ["roof", "grass", "water"], tokenizer(texts)
    return ClassMapDetector(prompted, tokens, names, texts, TINY_MODEL, evidence=evidence, evidence_weight=0.3)


@pytest.fixture(scope="module")
def shots() -> tuple[torch.Tensor, torch.Tensor]:
    masks = torch.cat([stripes(4), stripes(2)]).repeat(1, 2, 2)  # 64 px: the tiny CLIP's size
    return painted(masks, 2, noise_std=90.0), masks  # colours overlap: the evidence alone is not sure


def test_map_is_clip_logits_plus_weighted_evidence(clip_and_tokenizer: tuple, shots: tuple) -> None:
    detector = detector_with_evidence(clip_and_tokenizer, *shots).eval()
    images = shots[0][:2]
    with torch.no_grad():
        expected = detector.logits_for(images, detector.text_tokens) + 0.3 * detector.evidence(images)
        torch.testing.assert_close(detector(images), expected)
        torch.testing.assert_close(detector(images, detector.evidence(images)), expected)
    assert detector.num_trainable == detector.prompted.num_trainable + 1


def test_tuning_moves_the_weight_and_a_resume_reproduces_it(
    clip_and_tokenizer: tuple, shots: tuple, tmp_path: Path
) -> None:
    cfg = config("detector.tune", max_steps=4, batch_size=3, loss_threshold=0.0, checkpoint_every=2)
    straight = detector_with_evidence(clip_and_tokenizer, *shots)
    full = tune(straight, *shots, cfg, 1, CPU, checkpoint_dir=tmp_path / "a")
    assert straight.evidence_weight.item() != pytest.approx(0.3, abs=1e-4), "the evidence weight did not train"

    def killed_at_step_3(step: int, loss: float) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        killed = detector_with_evidence(clip_and_tokenizer, *shots)
        tune(killed, *shots, cfg, 1, CPU, tmp_path / "b", on_step=killed_at_step_3)
    resumed = detector_with_evidence(clip_and_tokenizer, *shots)
    rest = tune(resumed, *shots, cfg, 99, CPU, resume_from=tmp_path / "b" / "step00002.pt")
    assert rest.losses == full.losses
    for key, value in straight.tuned_state_dict().items():
        torch.testing.assert_close(value, resumed.tuned_state_dict()[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("kind", ["gaussian", "mlp"])
def test_saved_evidence_gives_the_same_map_after_loading(clip_and_tokenizer: tuple, shots: tuple, kind: str) -> None:
    detector = detector_with_evidence(clip_and_tokenizer, *shots, kind=kind).eval()
    with torch.no_grad():
        detector.evidence_weight.fill_(0.7)
    state = {
        "prompt_config": {"n_ctx": 2, "depth": 2, "similarity_layers": (2, 3), "mode": "coupled"},
        "prompt_state": detector.prompted.prompt_state_dict(),
        "pixel_evidence": evidence_payload(detector),
        "class_names": detector.class_names,
        "texts": detector.texts,
        "clip_model": TINY_MODEL,
    }
    loaded = detector_from_state(state, clip_and_tokenizer[0], clip_and_tokenizer[1], Path("detector.pt")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(shots[0][:2]), detector(shots[0][:2]))


def test_cross_fitting_weights_a_telling_expert_up_and_a_blind_one_down(clip_and_tokenizer: tuple) -> None:
    masks = torch.cat([stripes(4), stripes(2)]).repeat(1, 2, 2)  # 64 px: the tiny CLIP's size
    coloured = painted(masks, 3, noise_std=40.0)  # the colours tell the classes apart: trust the pixels
    grey = torch.full_like(coloured, 128) + torch.randint_like(coloured, 0, 3)  # nothing in the pixels
    detector = detector_with_evidence(clip_and_tokenizer, coloured, masks)

    def fit(images: torch.Tensor, labels: torch.Tensor) -> PixelMLP:
        return PixelMLP([5], 3, hidden=16).fit(images, labels, steps=100)

    telling = cross_fitted_weight(detector, fit, coloured, masks, batch_size=4, fallback=0.3, device=CPU)
    blind = cross_fitted_weight(detector, fit, grey, masks, batch_size=4, fallback=0.3, device=CPU)
    assert telling in WEIGHTS and blind in WEIGHTS
    assert telling >= 1.0 and blind == 0.0, (telling, blind)


def test_cross_fitting_falls_back_when_a_fold_has_no_labelled_pixel(clip_and_tokenizer: tuple, shots: tuple) -> None:
    images, masks = shots
    unlabelled_odd = masks.clone()
    unlabelled_odd[1::2] = 255
    detector = detector_with_evidence(clip_and_tokenizer, images, masks)

    def fit(tiles: torch.Tensor, labels: torch.Tensor) -> PixelGaussians:
        return PixelGaussians([5], 3).fit(tiles, labels)

    assert cross_fitted_weight(detector, fit, images, unlabelled_odd, 4, fallback=0.42, device=CPU) == 0.42
