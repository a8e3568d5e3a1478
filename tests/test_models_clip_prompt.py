"""PromptedCLIP (method B) and its losses on the tiny registered ViT, random init, CPU."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ms2rgb.models.clip_backbone import TINY_MODEL, load_clip
from ms2rgb.models.clip_prompt import (
    MODES,
    PromptConfig,
    PromptedCLIP,
    class_map,
    fuse_layer_logits,
    insert_text_prompts,
)
from ms2rgb.models.seg_losses import dice_loss, focal_loss, segmentation_loss

CLASSES = ["annual crop land", "forest", "river", "sea or lake"]
N_CTX, DEPTH = 2, 3


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


def make(backbone: tuple, mode: str = "coupled", seed: int = 0, **kw: object) -> PromptedCLIP:
    torch.manual_seed(seed)
    cfg = PromptConfig(n_ctx=N_CTX, depth=DEPTH, similarity_layers=(1, 2, 3), mode=mode, **kw)
    return PromptedCLIP(backbone[0], cfg)


@contextmanager
def block_inputs(blocks: nn.ModuleList) -> Iterator[dict[int, torch.Tensor]]:
    """Record the token sequence each residual block receives."""
    seen: dict[int, torch.Tensor] = {}
    hooks = [
        blk.register_forward_pre_hook(lambda _m, args, i=i: seen.__setitem__(i, args[0].detach().clone()))
        for i, blk in enumerate(blocks)
    ]
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


# ---------------------------------------------------------------- text side


def test_zero_shot_reproduces_open_clip(backbone: tuple, tokens: torch.Tensor, images: torch.Tensor) -> None:
    clip = backbone[0]
    model = make(backbone, "zero_shot")
    torch.testing.assert_close(model.encode_text(tokens), clip.encode_text(tokens, normalize=True))
    ref = clip.visual.forward_intermediates(
        images, indices=[1, 2, 3], normalize_intermediates=True, intermediates_only=True, output_fmt="NLC"
    )["image_intermediates"]
    ours, grid = model.encode_patches(images)
    assert grid == (8, 8)
    for r, o in zip(ref, ours):
        torch.testing.assert_close(o, F.normalize(r @ clip.visual.proj, dim=-1))


def test_text_prompts_inserted_then_replaced(backbone: tuple, tokens: torch.Tensor) -> None:
    clip = backbone[0]
    model = make(backbone, "coupled")
    pos = clip.positional_embedding
    emb = clip.token_embedding(tokens)  # (K, L, W)
    length = tokens.shape[1]
    with torch.no_grad(), block_inputs(clip.transformer.resblocks) as seen:
        model.encode_text(tokens)
    x0 = seen[0]
    assert x0.shape == (len(CLASSES), clip.context_length, clip.transformer.width)
    ctx = model.text_ctx.detach()
    torch.testing.assert_close(x0[:, 0], emb[:, 0] + pos[0])  # start token stays first
    torch.testing.assert_close(x0[:, 1 : 1 + N_CTX], (ctx[0] + pos[1 : 1 + N_CTX]).expand_as(x0[:, 1 : 1 + N_CTX]))
    torch.testing.assert_close(x0[:, 1 + N_CTX :], emb[:, 1 : length - N_CTX] + pos[1 + N_CTX :])  # shifted
    for i in range(1, DEPTH):
        torch.testing.assert_close(seen[i][:, 1 : 1 + N_CTX], ctx[i].expand(len(CLASSES), -1, -1))
    assert not torch.allclose(seen[DEPTH][:, 1 : 1 + N_CTX], ctx[DEPTH - 1].expand(len(CLASSES), -1, -1))


def test_text_pools_at_moved_eot(backbone: tuple) -> None:
    clip, tokenizer = backbone
    model = make(backbone, "text")
    long_desc = " ".join(["very"] * 40) + " dense forest"  # fills the context, EOT at the last slot
    toks = tokenizer(["river", long_desc])
    eot_old = toks.argmax(dim=-1)
    assert eot_old.tolist()[1] == clip.context_length - 1
    final: dict[str, torch.Tensor] = {}
    handle = clip.ln_final.register_forward_hook(lambda _m, _a, out: final.__setitem__("x", out.detach()))
    with torch.no_grad(), block_inputs(clip.transformer.resblocks) as seen:
        feats = model.encode_text(toks)
    handle.remove()
    eot_new = torch.tensor([eot_old[0] + N_CTX, clip.context_length - 1])
    eot_emb = clip.token_embedding(toks[torch.arange(2), eot_old])  # (2, W)
    torch.testing.assert_close(seen[0][torch.arange(2), eot_new], eot_emb + clip.positional_embedding[eot_new])
    pooled = final["x"][torch.arange(2), eot_new] @ clip.text_projection
    torch.testing.assert_close(feats, F.normalize(pooled, dim=-1))


def test_insert_text_prompts_keeps_length_and_eot() -> None:
    x = torch.arange(6.0).reshape(1, 6, 1).repeat(2, 1, 1)  # (K=2, L=6, W=1): token i has value i
    ctx = torch.full((2, 1), -1.0)
    out, eot = insert_text_prompts(x, ctx, torch.tensor([2, 5]))
    assert out[0, :, 0].tolist() == [0, -1, -1, 1, 2, 3]
    assert out[1, :, 0].tolist() == [0, -1, -1, 1, 2, 5]  # EOT (value 5) kept at the last slot
    assert eot.tolist() == [4, 5]


# ---------------------------------------------------------------- image side


@pytest.mark.parametrize("mode", ["coupled", "independent", "visual"])
def test_visual_prompts_appended_then_replaced(backbone: tuple, images: torch.Tensor, mode: str) -> None:
    clip = backbone[0]
    model = make(backbone, mode)
    blocks = clip.visual.transformer.resblocks
    carried: dict[str, torch.Tensor] = {}
    handle = blocks[DEPTH - 1].register_forward_hook(lambda _m, _a, out: carried.__setitem__("x", out.detach()))
    with torch.no_grad(), block_inputs(blocks) as seen:
        model.encode_patches(images)
        prompts = model.visual_prompts()
    handle.remove()
    n_patches = 64
    for i in range(len(blocks)):
        assert seen[i].shape[1] == 1 + n_patches + N_CTX
    torch.testing.assert_close(seen[0][:, -N_CTX:], clip.visual.ln_pre(prompts[0]).expand(2, -1, -1))
    for i in range(1, DEPTH):
        torch.testing.assert_close(seen[i][:, -N_CTX:], prompts[i].expand(2, -1, -1))
    torch.testing.assert_close(seen[DEPTH][:, -N_CTX:], carried["x"][:, -N_CTX:])  # kept past depth
    if mode == "coupled":
        for i in range(DEPTH):
            torch.testing.assert_close(prompts[i], model.couplers[i](model.text_ctx[i]))


@pytest.mark.parametrize("mode", ["zero_shot", "text"])
def test_no_visual_prompts_without_visual_mode(backbone: tuple, images: torch.Tensor, mode: str) -> None:
    model = make(backbone, mode)
    with torch.no_grad(), block_inputs(backbone[0].visual.transformer.resblocks) as seen:
        model.encode_patches(images)
    assert all(x.shape[1] == 1 + 64 for x in seen.values())


# ---------------------------------------------------------------- training


EXPECTED = {
    "zero_shot": set(),
    "text": {"text_ctx"},
    "visual": {"visual_ctx"},
    "independent": {"text_ctx", "visual_ctx"},
    "coupled": {"text_ctx"} | {f"couplers.{i}.{p}" for i in range(DEPTH) for p in ("weight", "bias")},
}


@pytest.mark.parametrize("mode", MODES)
def test_trainable_parameters_per_mode(backbone: tuple, mode: str) -> None:
    model = make(backbone, mode)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == EXPECTED[mode]
    assert set(model.prompt_state_dict()) == names
    wt, wv = 128, 128
    counts = {
        "zero_shot": 0,
        "text": DEPTH * N_CTX * wt,
        "visual": DEPTH * N_CTX * wv,
        "independent": DEPTH * N_CTX * (wt + wv),
        "coupled": DEPTH * N_CTX * wt + DEPTH * (wt * wv + wv),
    }
    assert model.num_trainable == counts[mode]
    assert not any(p.requires_grad for p in model.clip.parameters())


@pytest.mark.parametrize("mode", ["coupled", "independent", "text", "visual"])
def test_one_step_moves_only_prompts(backbone: tuple, tokens: torch.Tensor, images: torch.Tensor, mode: str) -> None:
    model = make(backbone, mode).train()
    assert not model.clip.training
    frozen = {k: v.clone() for k, v in model.clip.state_dict().items()}
    before = {k: v.clone() for k, v in model.prompt_state_dict().items()}
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
    target = torch.randint(0, len(CLASSES), (2, 64, 64), generator=torch.Generator().manual_seed(2))
    segmentation_loss(model(images, tokens), target).backward()
    opt.step()
    for k, v in model.clip.state_dict().items():
        assert torch.equal(v, frozen[k]), f"frozen CLIP tensor {k} changed"
    assert all(p.grad is None for p in model.clip.parameters())
    for k, v in model.prompt_state_dict().items():
        assert not torch.equal(v, before[k]), f"trainable {k} did not move"


def test_same_seed_same_model_and_output(backbone: tuple, tokens: torch.Tensor, images: torch.Tensor) -> None:
    a, b = make(backbone, seed=5), make(backbone, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(a(images, tokens), b(images, tokens), rtol=0, atol=0)


# ---------------------------------------------------------------- maps and fusion


def test_fusion_means_logits_then_upsamples() -> None:
    # Two layers, K=2 classes, a 1x2 patch grid.
    layer_a = torch.tensor([[[[2.0, 0.0]], [[0.0, 0.0]]]])  # (1, 2, 1, 2)
    layer_b = torch.tensor([[[[0.0, 0.0]], [[4.0, 2.0]]]])
    fused = fuse_layer_logits([layer_a, layer_b], (1, 4))
    # mean: class0 [1, 0], class1 [2, 1]; bilinear x2 (align_corners=False) blends 3:1 inside.
    expected = torch.tensor([[[[1.0, 0.75, 0.25, 0.0]], [[2.0, 1.75, 1.25, 1.0]]]])
    torch.testing.assert_close(fused, expected)
    assert class_map(fused).tolist() == [[[1, 1, 1, 1]]]


def test_forward_fuses_layer_logits(
    backbone: tuple, tokens: torch.Tensor, images: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = make(backbone)
    maps = [torch.full((2, 4, 8, 8), float(i)) for i in (1, 2, 6)]
    monkeypatch.setattr(model, "layer_logits", lambda *_: maps)
    torch.testing.assert_close(model(images, tokens), torch.full((2, 4, 64, 64), 3.0))


@pytest.mark.parametrize("mode", ["zero_shot", "coupled"])
def test_per_layer_maps_differ(backbone: tuple, tokens: torch.Tensor, images: torch.Tensor, mode: str) -> None:
    with torch.no_grad():
        maps = make(backbone, mode).layer_logits(images, tokens)
    assert len(maps) == 3 and all(m.shape == (2, len(CLASSES), 8, 8) for m in maps)
    for i in range(len(maps)):
        for j in range(i + 1, len(maps)):
            assert (maps[i] - maps[j]).abs().max() > 1e-3, f"layers {i} and {j} gave the same map"


@pytest.mark.parametrize("size", [(64, 64), (32, 48), (80, 64)])
def test_forward_any_patch_multiple(backbone: tuple, tokens: torch.Tensor, size: tuple[int, int]) -> None:
    model = make(backbone)
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size), tokens)
        pred = model.predict(torch.randn(1, 3, *size), tokens)
    assert out.shape == (1, len(CLASSES), *size) and torch.isfinite(out).all()
    assert pred.shape == (1, *size) and pred.dtype == torch.long and pred.max() < len(CLASSES)


def test_bad_inputs_and_configs_raise(backbone: tuple, tokens: torch.Tensor) -> None:
    model = make(backbone)
    with pytest.raises(ValueError, match="multiples of the patch size"):
        model(torch.randn(1, 3, 60, 64), tokens)
    with pytest.raises(ValueError, match="depth=5 exceeds"):
        PromptedCLIP(backbone[0], PromptConfig(depth=5))
    with pytest.raises(ValueError, match="similarity_layers holds 4"):
        PromptedCLIP(backbone[0], PromptConfig(similarity_layers=(2, 4)))
    with pytest.raises(ValueError, match="mode='maple'"):
        PromptConfig(mode="maple")
    with pytest.raises(TypeError, match="open_clip.CLIP"):
        PromptedCLIP(nn.Linear(2, 2), PromptConfig())


def test_to_moves_frozen_clip(backbone: tuple, tokens: torch.Tensor) -> None:
    torch.manual_seed(0)
    clip, _, _ = load_clip(TINY_MODEL, None)  # own copy: .to() below changes it in place
    model = PromptedCLIP(clip, PromptConfig(n_ctx=1, depth=1, similarity_layers=(-1,))).to(torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64, dtype=torch.float64), tokens).dtype == torch.float64


# ---------------------------------------------------------------- losses


def _onehot_logits(target: torch.Tensor, k: int, scale: float = 30.0) -> torch.Tensor:
    return scale * F.one_hot(target, k).permute(0, 3, 1, 2).float()  # (B, K, H, W)


def test_losses_near_zero_when_right_and_large_when_wrong() -> None:
    target = torch.randint(0, 4, (2, 8, 8), generator=torch.Generator().manual_seed(0))
    right = _onehot_logits(target, 4)
    wrong = _onehot_logits((target + 1) % 4, 4)
    assert focal_loss(right, target) < 1e-6 and dice_loss(right, target) < 1e-3
    assert focal_loss(wrong, target) > 1.0 and dice_loss(wrong, target) > 0.9
    assert segmentation_loss(wrong, target) > segmentation_loss(right, target) + 1.0


def test_losses_skip_ignored_pixels_and_absent_classes() -> None:
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[:, :, 2:] = 1  # classes 2..5 of K=6 never appear
    logits = _onehot_logits(target, 6)
    target[:, 0, 0] = 255
    logits[:, :, 0, 0] = _onehot_logits(torch.full((1, 1, 1), 3), 6)[:, :, 0, 0]  # wrong where ignored
    assert segmentation_loss(logits, target) < 1e-3


def test_losses_reject_bad_targets() -> None:
    logits = torch.zeros(1, 3, 4, 4, requires_grad=True)
    with pytest.raises(ValueError, match="target"):
        focal_loss(logits, torch.zeros(1, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="outside 0..2"):
        dice_loss(logits, torch.full((1, 4, 4), 3))
    loss = segmentation_loss(logits, torch.full((1, 4, 4), 255))
    loss.backward()  # all pixels ignored: zero loss, still differentiable
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))
