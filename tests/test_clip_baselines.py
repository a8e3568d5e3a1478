"""Method B's CLIP baselines (issue 23), meta_net (CoCoOp-style) and linear_probe, on the tiny random CLIP, CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers_params import config
from torch import nn

from ms2rgb.models.clip_backbone import TINY_MODEL, load_clip
from ms2rgb.models.clip_detector import ClassMapDetector
from ms2rgb.models.clip_linear_probe import LinearProbeCLIP
from ms2rgb.models.clip_meta_prompt import MetaNetConfig, MetaPromptedCLIP
from ms2rgb.models.clip_prompt import PromptConfig, PromptedCLIP
from ms2rgb.models.seg_losses import segmentation_loss
from ms2rgb.tasks.detection.tune import latest_checkpoint, tune

CLASSES = ["annual crop land", "forest", "river", "sea or lake"]
N_CTX, DEPTH, LAYERS = 2, 3, (1, 2, 3)
WT, D = 128, 128  # tiny CLIP: text width, joint embedding dim
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def backbone() -> tuple[nn.Module, object]:
    torch.manual_seed(0)
    model, tokenizer, _ = load_clip(TINY_MODEL, None)
    return model, tokenizer


@pytest.fixture(scope="module")
def tokens(backbone: tuple) -> torch.Tensor:
    return backbone[1](CLASSES)  # (K, 32)


@pytest.fixture()
def images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def tiles() -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 tiles whose class is their colour, per vertical half: learnable from any features."""
    gen = torch.Generator().manual_seed(3)
    colours = torch.tensor([[200, 40, 40], [40, 160, 40], [40, 40, 220], [220, 220, 220]], dtype=torch.float32)
    masks = torch.zeros(8, 64, 64, dtype=torch.uint8)
    images = torch.zeros(8, 3, 64, 64)
    for i in range(8):
        left, right = torch.randperm(len(CLASSES), generator=gen)[:2].tolist()
        masks[i, :, :32], masks[i, :, 32:] = left, right
        images[i] = colours[masks[i].long()].permute(2, 0, 1)
    images = (images + 20 * torch.randn(images.shape, generator=gen)).clamp(0, 255).to(torch.uint8)
    masks[:, :2] = 255  # ignored rows
    return images, masks


def meta(backbone: tuple, mode: str = "independent", seed: int = 0) -> MetaPromptedCLIP:
    torch.manual_seed(seed)
    return MetaPromptedCLIP(backbone[0], PromptConfig(n_ctx=N_CTX, depth=DEPTH, similarity_layers=LAYERS, mode=mode))


def probe(backbone: tuple, seed: int = 0, layers: tuple[int, ...] = LAYERS) -> LinearProbeCLIP:
    torch.manual_seed(seed)
    return LinearProbeCLIP(backbone[0], PromptConfig(similarity_layers=layers), len(CLASSES))


def detector(backbone: tuple, prompted: PromptedCLIP) -> ClassMapDetector:
    return ClassMapDetector(prompted, backbone[1](CLASSES), CLASSES, CLASSES, TINY_MODEL)


BUILDERS = {"meta_net": meta, "linear_probe": probe}


# ---------------------------------------------------------------- shapes and parameters


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_layer_maps_and_fused_logits_have_the_method_shapes(
    backbone: tuple, tokens: torch.Tensor, images: torch.Tensor, name: str
) -> None:
    model = BUILDERS[name](backbone)
    with torch.no_grad():
        maps = model.layer_logits(images, tokens)
        out = model(images, tokens)
    assert len(maps) == len(LAYERS) and all(m.shape == (2, len(CLASSES), 8, 8) for m in maps)
    assert out.shape == (2, len(CLASSES), 64, 64) and torch.isfinite(out).all()
    rgb = torch.randint(0, 256, (3, 3, 64, 64), generator=torch.Generator().manual_seed(4), dtype=torch.uint8)
    with torch.no_grad():
        assert detector(backbone, model)(rgb).shape == (3, len(CLASSES), 64, 64)


def _meta_count(text: bool, visual: bool) -> int:
    hidden = D // 16
    return text * DEPTH * N_CTX * WT + visual * DEPTH * N_CTX * 128 + (D * hidden + hidden) + (hidden * WT + WT)


@pytest.mark.parametrize(
    ("name", "mode", "expected", "count"),
    [
        ("meta_net", "text", {"text_ctx"}, _meta_count(True, False)),
        ("meta_net", "independent", {"text_ctx", "visual_ctx"}, _meta_count(True, True)),
        ("linear_probe", None, set(), len(LAYERS) * (D * len(CLASSES) + len(CLASSES))),
    ],
)
def test_only_the_intended_parameters_train(
    backbone: tuple, tokens: torch.Tensor, images: torch.Tensor, name: str, mode: str | None, expected: set, count: int
) -> None:
    model = meta(backbone, mode) if name == "meta_net" else probe(backbone)
    extra = "meta_net" if name == "meta_net" else "heads"
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in names if not n.startswith(extra)} == expected and any(n.startswith(extra) for n in names)
    assert set(model.prompt_state_dict()) == names and model.num_trainable == count
    assert not any(p.requires_grad for p in model.clip.parameters())
    model.train()
    assert not model.clip.training
    frozen = {k: v.clone() for k, v in model.clip.state_dict().items()}
    before = {k: v.clone() for k, v in model.prompt_state_dict().items()}
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
    target = torch.randint(0, len(CLASSES), (2, 64, 64), generator=torch.Generator().manual_seed(2))
    segmentation_loss(model(images, tokens), target).backward()
    opt.step()
    assert all(torch.equal(v, frozen[k]) for k, v in model.clip.state_dict().items())
    assert all(p.grad is None for p in model.clip.parameters())
    for k, v in model.prompt_state_dict().items():
        assert not torch.equal(v, before[k]), f"trainable {k} did not move"


def test_bad_configs_and_foreign_classes_raise(backbone: tuple, tokens: torch.Tensor, images: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="'coupled' is method B"):
        MetaPromptedCLIP(backbone[0], PromptConfig(mode="coupled"))
    with pytest.raises(ValueError, match="reduction=0"):
        MetaNetConfig(reduction=0)
    with pytest.raises(ValueError, match="cannot score 2 other descriptions"):
        probe(backbone)(images, tokens[:2])


# ---------------------------------------------------------------- the meta-network's conditioning


def test_meta_net_gives_each_image_its_own_class_texts(
    backbone: tuple, tokens: torch.Tensor, images: torch.Tensor
) -> None:
    model = meta(backbone)
    with torch.no_grad():
        patches, _ = model.encode_patches(images)
        text = model.encode_text_per_image(tokens, model.meta_net(model.image_feature(patches)))
    assert text.shape == (2, len(CLASSES), D)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2, len(CLASSES)))
    assert (text[0] - text[1]).abs().max() > 1e-4, "two images got the same class texts"


@pytest.mark.parametrize("mode", ["text", "independent"])
def test_zero_bias_reproduces_the_shared_prompt_text_features(backbone: tuple, tokens: torch.Tensor, mode: str) -> None:
    """The batched (B*K) text pass is PromptedCLIP.encode_text per image, shifted only by the bias."""
    model = meta(backbone, mode)
    with torch.no_grad():
        shared = model.encode_text(tokens)  # (K, D)
        per_image = model.encode_text_per_image(tokens, torch.zeros(3, WT))
        bias = torch.randn(WT, generator=torch.Generator().manual_seed(5))
        shifted = model.encode_text_per_image(tokens, bias.expand(3, -1))
        model.text_ctx[0] += bias  # the same shift written into the shared layer-0 prompts
        moved = model.encode_text(tokens)
    torch.testing.assert_close(per_image, shared.expand(3, -1, -1))
    torch.testing.assert_close(shifted, moved.expand(3, -1, -1))


# ---------------------------------------------------------------- tune(), determinism, state


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_a_few_tune_steps_lower_the_loss(backbone: tuple, tiles: tuple, name: str) -> None:
    det = detector(backbone, BUILDERS[name](backbone))
    images, masks = tiles

    def loss() -> float:
        det.eval()
        with torch.no_grad():
            return float(segmentation_loss(det(images), masks.long()))

    before = loss()
    result = tune(det, images, masks, config("detector.tune", max_steps=8, batch_size=4, loss_threshold=0.0), 0, CPU)
    assert len(result.losses) == 8
    assert loss() < before - 0.05, f"{name}: loss {before:.3f} -> {loss():.3f}"


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_same_seed_same_tuned_model(backbone: tuple, tiles: tuple, name: str) -> None:
    cfg = config("detector.tune", max_steps=2, batch_size=3, loss_threshold=0.0)
    a, b = (detector(backbone, BUILDERS[name](backbone, seed=5)) for _ in range(2))
    other = BUILDERS[name](backbone, seed=6).prompt_state_dict()
    assert any(not torch.equal(v, other[k]) for k, v in a.prompted.prompt_state_dict().items()), "seed unused"
    run_a, run_b = tune(a, *tiles, cfg, 7, CPU), tune(b, *tiles, cfg, 7, CPU)
    assert run_a.losses == run_b.losses
    for key, value in a.prompted.prompt_state_dict().items():
        assert torch.equal(value, b.prompted.prompt_state_dict()[key]), key
    with torch.no_grad():
        assert torch.equal(a.eval()(tiles[0][:2]), b.eval()(tiles[0][:2]))


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_state_dict_round_trip_and_tune_checkpoint(backbone: tuple, tiles: tuple, name: str, tmp_path: Path) -> None:
    cfg = config("detector.tune", max_steps=2, batch_size=3, loss_threshold=0.0, checkpoint_every=1)
    trained = detector(backbone, BUILDERS[name](backbone, seed=1))
    tune(trained, *tiles, cfg, 0, CPU, checkpoint_dir=tmp_path)
    torch.save(trained.prompted.prompt_state_dict(), tmp_path / "prompts.pt")
    fresh = BUILDERS[name](backbone, seed=2)
    fresh.load_state_dict(torch.load(tmp_path / "prompts.pt", weights_only=True), strict=False)
    checkpoint = torch.load(latest_checkpoint(tmp_path), weights_only=True)
    assert set(checkpoint["tuned_state"]) == {f"prompted.{k}" for k in fresh.prompt_state_dict()}
    with torch.no_grad():
        reloaded, tuned = detector(backbone, fresh)(tiles[0][:2]), trained.eval()(tiles[0][:2])
    torch.testing.assert_close(reloaded, tuned, rtol=0, atol=0)


def test_probe_on_the_last_layer_only(backbone: tuple, tokens: torch.Tensor, images: torch.Tensor) -> None:
    model = probe(backbone, layers=(-1,))
    assert model.similarity_layers == (3,) and model.num_trainable == D * len(CLASSES) + len(CLASSES)
    with torch.no_grad():
        assert model(images, tokens).shape == (2, len(CLASSES), 64, 64)
