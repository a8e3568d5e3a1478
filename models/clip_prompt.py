"""Few-shot multimodal prompt tuning of a frozen open_clip CLIP into a per-pixel class map.

Method B (docs/methods.md §B.2–§B.4): only prompt vectors and one projection per prompted layer
train; the CLIP stays frozen. Text prompts are spliced in right after the start token
of each class description (MaPLe), image prompts are appended to the patch sequence
and, in the "coupled" mode, are a per-layer linear projection of the text prompts of
the twin language layer. Patch tokens of selected vision layers are scored against the
class text features; the per-layer maps are fused into one class-logit map.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from ms2rgb.models.clip_backbone import freeze

MODES = ("zero_shot", "text", "visual", "independent", "coupled")
TEXT_PROMPT_MODES = ("text", "independent", "coupled")


@dataclass
class PromptConfig:
    """How PromptedCLIP prompts the frozen CLIP and where it reads patch similarities."""

    n_ctx: int = 2  # prompt vectors per prompted layer (MaPLe uses 2)
    depth: int = 3  # prompted leading layers; language layer i is twinned with vision layer i
    similarity_layers: tuple[int, ...] = (-3, -2, -1)  # 0-based vision layers scored (negative: from the end)
    mode: str = "coupled"  # one of MODES; "coupled" is the method, the others are ablations
    init_std: float = 0.02  # std of the normal init of learned prompt vectors (MaPLe's deep prompts)
    logit_scale: float | None = None  # patch-text temperature (params.yaml sets 1/0.07); None: the CLIP's own

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"PromptConfig.mode={self.mode!r} is not one of {MODES}")
        if self.n_ctx < 1 or self.depth < 1:
            raise ValueError(
                f"PromptConfig.n_ctx={self.n_ctx} and depth={self.depth} must both be >= 1 "
                f"(use mode='zero_shot' for no prompts)"
            )
        if not self.similarity_layers:
            raise ValueError("PromptConfig.similarity_layers is empty; name at least one vision layer")
        self.similarity_layers = tuple(int(i) for i in self.similarity_layers)  # YAML gives lists


def fuse_layer_logits(layer_logits: Sequence[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
    """Fuse per-layer patch logits into one per-pixel logit map.

    Rule (AdaCLIP-style): average the per-layer logits (B, K, gh, gw) first, then upsample
    the mean bilinearly to ``size``. Softmax over K of the result gives class scores and
    argmax the class annotation image. Averaging logits before the softmax keeps one
    over-confident layer from dominating, unlike AnomalyCLIP's sum of per-layer softmaxes.
    """
    if not layer_logits:
        raise ValueError("fuse_layer_logits needs at least one layer map")
    shapes = {tuple(m.shape) for m in layer_logits}
    if len(shapes) != 1:
        raise ValueError(f"per-layer logit maps differ in shape: {sorted(shapes)}")
    mean = torch.stack(list(layer_logits), dim=0).mean(dim=0)  # (B, K, gh, gw)
    return F.interpolate(mean, size=tuple(size), mode="bilinear", align_corners=False)


def class_map(logits: torch.Tensor) -> torch.Tensor:
    """Per-pixel class annotation image (B, H, W) from logits (B, K, H, W)."""
    return logits.argmax(dim=1)


def insert_text_prompts(x: torch.Tensor, ctx: torch.Tensor, eot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Insert prompts right after the start token, keeping the sequence length.

    Args:
        x: token embeddings (K, L, W); position 0 holds the start token.
        ctx: prompt vectors (n, W).
        eot: end-of-text positions (K,) in ``x``.

    Returns:
        (K, L, W) embeddings and the moved end-of-text positions. Tokens pushed past L
        are dropped; if that would drop the end-of-text token it is written at L-1,
        mirroring how open_clip's tokenizer truncates.
    """
    k, length, _ = x.shape
    n = ctx.shape[0]
    if n >= length - 1:
        raise ValueError(f"n_ctx={n} leaves no room for text in context_length={length}")
    eot_emb = x[torch.arange(k, device=x.device), eot]  # (K, W), read before it may be dropped
    out = torch.cat([x[:, :1], ctx.unsqueeze(0).expand(k, -1, -1), x[:, 1 : length - n]], dim=1)
    new_eot = eot + n
    overflow = new_eot >= length
    if overflow.any():
        out = out.clone()
        out[overflow, length - 1] = eot_emb[overflow]
        new_eot = torch.where(overflow, torch.full_like(new_eot, length - 1), new_eot)
    return out, new_eot


def resize_pos_embed(pos: torch.Tensor, grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """Bicubically resample a ViT's (1 + gh*gw, W) positional embedding to another grid."""
    if tuple(grid) == tuple(new_grid):
        return pos
    width = pos.shape[-1]
    patches = pos[1:].reshape(1, grid[0], grid[1], width).permute(0, 3, 1, 2)  # (1, W, gh, gw)
    patches = F.interpolate(patches, size=new_grid, mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(-1, width)  # (gh'*gw', W)
    return torch.cat([pos[:1], patches], dim=0)


def _run_block(block: nn.Module, x: torch.Tensor, mask: torch.Tensor | None, batch_first: bool) -> torch.Tensor:
    """Apply one open_clip residual block to batch-first tokens (N, L, W)."""
    if batch_first:
        return block(x, attn_mask=mask)
    return block(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)  # block wants (L, N, W)


class PromptedCLIP(nn.Module):
    """A frozen open_clip CLIP plus learned multimodal prompts -> per-pixel class logits.

    Only ``text_ctx`` (depth, n_ctx, text width), ``visual_ctx`` (depth, n_ctx, vision
    width) and the per-layer ``couplers`` (Linear text width -> vision width) can train,
    and which of them exist depends on ``cfg.mode``. The CLIP is a registered submodule,
    so ``.to(device)`` moves it, but its parameters never require grad and it stays in
    eval mode even under ``.train()``.
    """

    def __init__(self, clip: nn.Module, cfg: PromptConfig) -> None:
        super().__init__()
        if not isinstance(clip, open_clip.CLIP) or not isinstance(clip.visual, open_clip.transformer.VisionTransformer):
            raise TypeError(
                f"PromptedCLIP needs an open_clip.CLIP with a VisionTransformer visual tower, got "
                f"{type(clip).__name__}; build it with models.clip_backbone.load_clip"
            )
        # open_clip ships no type information, so its CLIP (checked above) types as Any; as nn.Module,
        # every attribute of its towers would type as Tensor | Module (nn.Module.__getattr__).
        self.clip: open_clip.CLIP = freeze(clip)
        self.cfg = cfg
        self.similarity_layers = self._resolve_layers(cfg)
        text_width = clip.transformer.width
        vision_width = clip.visual.transformer.width
        shape = (cfg.depth, cfg.n_ctx)
        self.text_ctx = self._prompt(shape + (text_width,)) if cfg.mode in TEXT_PROMPT_MODES else None
        self.visual_ctx = self._prompt(shape + (vision_width,)) if cfg.mode in ("visual", "independent") else None
        # MaPLe's coupling function: one linear map per prompted layer, no meta-network.
        self.couplers = (
            nn.ModuleList(nn.Linear(text_width, vision_width) for _ in range(cfg.depth))
            if cfg.mode == "coupled"
            else None
        )

    def _resolve_layers(self, cfg: PromptConfig) -> tuple[int, ...]:
        """Check depth against both towers and turn similarity_layers into 0-based indices."""
        n_text = len(self.clip.transformer.resblocks)
        n_vision = len(self.clip.visual.transformer.resblocks)
        if cfg.mode != "zero_shot" and cfg.depth > min(n_text, n_vision):
            raise ValueError(
                f"PromptConfig.depth={cfg.depth} exceeds the CLIP's layers (text {n_text}, vision {n_vision}); lower it"
            )
        resolved = []
        for i in cfg.similarity_layers:
            if not -n_vision <= i < n_vision:
                raise ValueError(
                    f"PromptConfig.similarity_layers holds {i}, outside the {n_vision} vision layers "
                    f"(valid: 0..{n_vision - 1} or -{n_vision}..-1)"
                )
            resolved.append(i % n_vision)
        if len(set(resolved)) != len(resolved):
            raise ValueError(f"PromptConfig.similarity_layers={cfg.similarity_layers} names a layer twice")
        return tuple(resolved)

    def _prompt(self, shape: tuple[int, ...]) -> nn.Parameter:
        """A learned prompt tensor with MaPLe's N(0, init_std) init."""
        return nn.Parameter(torch.randn(shape) * self.cfg.init_std)

    def train(self, mode: bool = True) -> PromptedCLIP:
        """Switch prompt modules' mode; the frozen CLIP always stays in eval mode."""
        super().train(mode)
        self.clip.eval()  # no dropout / patch dropout in the frozen towers
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimiser should see (prompts and couplers only)."""
        return [p for p in self.parameters() if p.requires_grad]

    @property
    def num_trainable(self) -> int:
        """Number of trainable scalars."""
        return sum(p.numel() for p in self.trainable_parameters())

    def prompt_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained part of the state dict, small enough to log as an artifact."""
        names = {name for name, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in names}

    def visual_prompts(self) -> torch.Tensor | None:
        """Image prompts per prompted layer (depth, n_ctx, vision width), or None."""
        if self.couplers is not None:
            assert self.text_ctx is not None, "coupled mode has text prompts"
            return torch.stack([proj(ctx) for proj, ctx in zip(self.couplers, self.text_ctx)])
        return self.visual_ctx

    @property
    def _dtype(self) -> torch.dtype:
        return self.clip.visual.conv1.weight.dtype

    def encode_text(self, text_tokens: torch.Tensor) -> torch.Tensor:
        """L2-normalised class text features (K, D) from token ids (K, L)."""
        clip = self.clip
        if text_tokens.ndim != 2 or text_tokens.shape[1] > clip.positional_embedding.shape[0]:
            raise ValueError(
                f"text_tokens must be (K, L<={clip.positional_embedding.shape[0]}) token ids, "
                f"got shape {tuple(text_tokens.shape)}; use the tokenizer from load_clip"
            )
        length = text_tokens.shape[1]
        x = clip.token_embedding(text_tokens).to(self._dtype)  # (K, L, Wt)
        eot = text_tokens.argmax(dim=-1)  # open_clip pools at the largest id, the EOT token
        ctx = None if self.text_ctx is None else self.text_ctx.to(self._dtype)
        if ctx is not None:
            x, eot = insert_text_prompts(x, ctx[0], eot)
        x = x + clip.positional_embedding[:length].to(self._dtype)
        mask = None if clip.attn_mask is None else clip.attn_mask[:length, :length]
        for i, block in enumerate(clip.transformer.resblocks):
            if ctx is not None and 0 < i < ctx.shape[0]:
                # Deeper prompts replace the previous layer's outputs at the prompt slots.
                x = torch.cat([x[:, :1], ctx[i].expand(x.shape[0], -1, -1), x[:, 1 + ctx.shape[1] :]], dim=1)
            x = _run_block(block, x, mask, clip.transformer.batch_first)
        x = clip.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot]  # (K, Wt)
        proj = clip.text_projection
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj  # (K, D)
        return F.normalize(x, dim=-1)

    def _embed_patches(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Class + patch tokens with positions (B, 1 + gh*gw, Wv), before ln_pre."""
        visual = self.clip.visual
        patch = visual.patch_size
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] % patch[0] or images.shape[3] % patch[1]:
            raise ValueError(
                f"images must be (B, 3, H, W) with H, W multiples of the patch size {patch}, "
                f"got shape {tuple(images.shape)}"
            )
        x = visual.conv1(images.to(self._dtype))  # (B, Wv, gh, gw)
        grid = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)  # (B, gh*gw, Wv)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, Wv)
        x = torch.cat([cls, x], dim=1)  # (B, 1 + gh*gw, Wv)
        # Patch dropout is skipped on purpose: every patch needs a score.
        pos = resize_pos_embed(visual.positional_embedding, visual.grid_size, grid)
        return x + pos.to(x.dtype), grid

    def encode_patches(self, images: torch.Tensor) -> tuple[list[torch.Tensor], tuple[int, int]]:
        """L2-normalised patch features (B, gh*gw, D) after each similarity layer, and the grid."""
        visual = self.clip.visual
        x, grid = self._embed_patches(images)
        n_patches = grid[0] * grid[1]
        ctx = self.visual_prompts()
        if ctx is not None:
            ctx = ctx.to(x.dtype)
            # MaPLe appends first-layer image prompts before ln_pre, so they are normalised too.
            x = torch.cat([x, ctx[0].expand(x.shape[0], -1, -1)], dim=1)  # (B, 1+P+n, Wv)
        x = visual.ln_pre(x)
        feats: dict[int, torch.Tensor] = {}
        for i, block in enumerate(visual.transformer.resblocks[: max(self.similarity_layers) + 1]):
            if ctx is not None and 0 < i < ctx.shape[0]:
                x = torch.cat([x[:, : -ctx.shape[1]], ctx[i].expand(x.shape[0], -1, -1)], dim=1)
            x = _run_block(block, x, None, visual.transformer.batch_first)
            if i in self.similarity_layers:
                feats[i] = x[:, 1 : 1 + n_patches]  # (B, P, Wv): drop cls and prompt tokens
        # The visual head maps every layer's tokens into the joint space (AnomalyCLIP).
        out = [F.normalize(visual.ln_post(feats[i]) @ visual.proj, dim=-1) for i in self.similarity_layers]
        return out, grid

    def logit_scale(self) -> torch.Tensor:
        """Temperature applied to the patch-text cosine similarities."""
        if self.cfg.logit_scale is not None:
            return torch.tensor(self.cfg.logit_scale, dtype=self._dtype)
        return self.clip.logit_scale.exp().clamp(max=100.0)  # CLIP training clamps it at 100

    def layer_logits(self, images: torch.Tensor, text_tokens: torch.Tensor) -> list[torch.Tensor]:
        """Per-similarity-layer class logits, each (B, K, gh, gw)."""
        text = self.encode_text(text_tokens)  # (K, D)
        patches, (gh, gw) = self.encode_patches(images)
        scale = self.logit_scale().to(text.device)
        maps = []
        for feats in patches:
            sim = torch.einsum("bpd,kd->bkp", feats, text)  # (B, K, P) cosine similarities
            maps.append(scale * sim.reshape(sim.shape[0], sim.shape[1], gh, gw))  # (B, K, gh, gw)
        return maps

    def forward(self, images: torch.Tensor, text_tokens: torch.Tensor) -> torch.Tensor:
        """Fused per-pixel class logits (B, K, H, W); see ``fuse_layer_logits``."""
        return fuse_layer_logits(self.layer_logits(images, text_tokens), images.shape[-2:])

    @torch.no_grad()
    def predict(self, images: torch.Tensor, text_tokens: torch.Tensor) -> torch.Tensor:
        """Class annotation image (B, H, W): argmax over classes of the fused logits."""
        return class_map(self(images, text_tokens))
