"""CoCoOp-style baseline for method B: a meta-network conditions the text prompts on each image (issue 23).

Method B (MaPLe) links its two branches by projecting the text prompts into image prompts
(``PromptConfig.mode = "coupled"``) and has no meta-network. CoCoOp (Zhou et al., CVPR 2022) links
them the other way: a small meta-network maps each image's feature to a bias that is added to the
first-layer text prompts, so every image gets its own class text features. This module is that
baseline on the same frozen CLIP, for the comparison of accuracy *and* cost the issue asks for.

What the baseline keeps from ``PromptedCLIP`` and why:

- The learned prompts are those of mode ``"text"`` (deep text prompts only, CoCoOp's branch at
  method B's depth) or ``"independent"`` (deep text prompts *and* separately learned image prompts).
  The stage's ``meta_net`` uses ``"independent"``: then both branches are prompted at the same
  depth as the method and differ from it only in the link, meta-network (image -> text, per image)
  instead of the coupling projection (text -> image, shared); ``"text"`` is CoCoOp itself with
  deep prompts.
- The meta-network's input is the image's own feature: the L2-normalised mean of the projected patch
  features of the deepest similarity layer (the last vision layer with the default layers), read
  from the same visual pass that is scored, so no second image pass is made. It is detached: in
  CoCoOp that feature comes from a frozen encoder and carries no gradient, and letting the meta path
  train the image prompts would add a second link between the branches, which is not the baseline.
- Only the first text layer's prompts get the bias (CoCoOp); deeper text prompts are shared.

The cost is the point: the text tower runs once per image *and* class, (B*K) sequences per step
(batched in one pass) where the method runs K, whatever the batch size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ms2rgb.models.clip_prompt import PromptConfig, PromptedCLIP, _run_block, insert_text_prompts

META_MODES = ("text", "independent")  # PromptConfig.mode values the meta-network can condition


@dataclass
class MetaNetConfig:
    """The meta-network of MetaPromptedCLIP (CoCoOp's Linear - ReLU - Linear)."""

    reduction: int = 16  # hidden width = CLIP output dim // reduction (CoCoOp: vis_dim // 16)

    def __post_init__(self) -> None:
        if self.reduction < 1:
            raise ValueError(f"MetaNetConfig.reduction={self.reduction} must be >= 1")


class MetaPromptedCLIP(PromptedCLIP):
    """PromptedCLIP whose first-layer text prompts are shifted per image by a meta-network.

    Trainable: ``text_ctx`` (and ``visual_ctx`` in mode "independent") as in PromptedCLIP, plus
    ``meta_net`` (Linear(D -> D // reduction) - ReLU - Linear(-> text width)). ``forward`` gives fused
    logits (B, K, H, W) like PromptedCLIP, so it plugs into ClassMapDetector and ``tune``.
    ``encode_text`` (inherited) gives the class features with no image bias.
    """

    KIND = "meta_net"  # what a saved payload should record to rebuild this class

    def __init__(self, clip: nn.Module, cfg: PromptConfig, meta: MetaNetConfig | None = None) -> None:
        if cfg.mode not in META_MODES:
            raise ValueError(
                f"MetaPromptedCLIP needs PromptConfig.mode in {META_MODES} (the prompts the meta-network "
                f"conditions), got {cfg.mode!r}; 'coupled' is method B itself"
            )
        super().__init__(clip, cfg)
        self.meta = meta or MetaNetConfig()
        out_dim = self.clip.visual.proj.shape[1]  # D, the joint space the patch features live in
        hidden = max(1, out_dim // self.meta.reduction)
        self.meta_net = nn.Sequential(
            nn.Linear(out_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, self.clip.transformer.width)
        )
        self._deepest = max(range(len(self.similarity_layers)), key=lambda j: self.similarity_layers[j])

    def image_feature(self, patches: list[torch.Tensor]) -> torch.Tensor:
        """The meta-network's input (B, D): deepest scored layer's patch mean, normalised, no gradient."""
        return F.normalize(patches[self._deepest].mean(dim=1), dim=-1).detach()

    def encode_text_per_image(self, text_tokens: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Class text features (B, K, D), L2-normalised, with ``bias`` (B, Wt) added to the layer-0 prompts.

        All B*K sequences go through the text tower in one batched pass.
        """
        clip, learned = self.clip, self.text_ctx
        assert learned is not None, "META_MODES all have text prompts"
        if text_tokens.ndim != 2 or text_tokens.shape[1] > clip.positional_embedding.shape[0]:
            raise ValueError(
                f"text_tokens must be (K, L<={clip.positional_embedding.shape[0]}) token ids, "
                f"got shape {tuple(text_tokens.shape)}; use the tokenizer from load_clip"
            )
        ctx = learned.to(self._dtype)  # (depth, n_ctx, Wt)
        (k, length), b, n = text_tokens.shape, bias.shape[0], ctx.shape[1]
        x = clip.token_embedding(text_tokens).to(self._dtype)  # (K, L, Wt)
        x, eot = insert_text_prompts(x, ctx[0], text_tokens.argmax(dim=-1))  # shared layer-0 prompts first
        x = x.unsqueeze(0).expand(b, -1, -1, -1)  # (B, K, L, Wt)
        shifted = x[:, :, 1 : 1 + n] + bias.to(self._dtype)[:, None, None, :]  # (B, K, n, Wt): CoCoOp's v + pi(x)
        x = torch.cat([x[:, :, :1], shifted, x[:, :, 1 + n :]], dim=2).reshape(b * k, length, -1)  # (B*K, L, Wt)
        eot = eot.repeat(b)  # (B*K,), image-major like x
        x = x + clip.positional_embedding[:length].to(self._dtype)
        mask = None if clip.attn_mask is None else clip.attn_mask[:length, :length]
        for i, block in enumerate(clip.transformer.resblocks):
            if 0 < i < ctx.shape[0]:  # deeper prompts are shared by every image (as in PromptedCLIP)
                x = torch.cat([x[:, :1], ctx[i].expand(x.shape[0], -1, -1), x[:, 1 + n :]], dim=1)
            x = _run_block(block, x, mask, clip.transformer.batch_first)
        x = clip.ln_final(x)[torch.arange(b * k, device=x.device), eot]  # (B*K, Wt)
        proj = clip.text_projection
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj  # (B*K, D)
        return F.normalize(x, dim=-1).reshape(b, k, -1)  # (B, K, D)

    def layer_logits(self, images: torch.Tensor, text_tokens: torch.Tensor) -> list[torch.Tensor]:
        """Per-similarity-layer class logits (B, K, gh, gw), each image scored against its own texts."""
        patches, (gh, gw) = self.encode_patches(images)
        text = self.encode_text_per_image(text_tokens, self.meta_net(self.image_feature(patches)))  # (B, K, D)
        scale = self.logit_scale().to(text.device)
        maps = []
        for feats in patches:
            sim = torch.einsum("bpd,bkd->bkp", feats, text)  # (B, K, P) cosine similarities
            maps.append(scale * sim.reshape(sim.shape[0], sim.shape[1], gh, gw))  # (B, K, gh, gw)
        return maps
