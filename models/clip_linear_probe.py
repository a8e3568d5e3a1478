"""Linear-probe baseline for method B: a 1x1 classifier on the frozen CLIP's patch features (issue 23).

It shows what the prompts add. The probe reads exactly the features the method scores, the
projected, L2-normalised patch tokens of each similarity layer of the *unprompted* CLIP (what
``PromptedCLIP.encode_patches`` returns in mode "zero_shot"), and puts one ``Linear(D -> K)`` on each
layer; the per-layer logit maps are fused like the method's (``fuse_layer_logits``: mean, then
bilinear upsampling to the tile). A mean of per-layer linear maps is one linear map of the
concatenated layers, so this is the classic linear probe on the method's multi-layer features; set
``similarity_layers=(-1,)`` for a probe on the last layer only.

No text is read: the probe is not open-vocabulary, and it refuses class tokens whose count differs
from its K. It subclasses PromptedCLIP only to present the interface ``ClassMapDetector`` and
``tune`` use (``.clip``, ``.cfg``, ``trainable_parameters``, ``num_trainable``,
``prompt_state_dict``, eval-mode CLIP under ``.train()``).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ms2rgb.models.clip_prompt import PromptConfig, PromptedCLIP


class LinearProbeCLIP(PromptedCLIP):
    """Frozen CLIP patch features -> one Linear(D, K) per similarity layer -> fused logits (B, K, H, W).

    Of ``cfg`` only ``similarity_layers`` is read (the probe has no prompts; ``cfg.mode`` is set to
    "zero_shot"). Trainable: ``heads`` only, ``len(similarity_layers) * (D * K + K)`` scalars.
    """

    KIND = "linear_probe"  # what a saved payload should record to rebuild this class

    def __init__(self, clip: nn.Module, cfg: PromptConfig, n_classes: int) -> None:
        if n_classes < 2:
            raise ValueError(f"LinearProbeCLIP needs n_classes >= 2, got {n_classes}")
        super().__init__(clip, dataclasses.replace(cfg, mode="zero_shot"))
        self.n_classes = n_classes
        out_dim = self.clip.visual.proj.shape[1]  # D, the joint space of the projected patch tokens
        self.heads = nn.ModuleList(nn.Linear(out_dim, n_classes) for _ in self.similarity_layers)

    def layer_logits(self, images: torch.Tensor, text_tokens: torch.Tensor) -> list[torch.Tensor]:
        """Per-similarity-layer class logits (B, K, gh, gw); ``text_tokens`` only fixes K."""
        if text_tokens.shape[0] != self.n_classes:
            raise ValueError(
                f"the linear probe was trained for {self.n_classes} classes and cannot score "
                f"{text_tokens.shape[0]} other descriptions (it reads no text); use a prompted detector"
            )
        with torch.no_grad():  # nothing before the heads trains: keep no activations for backward
            patches, (gh, gw) = self.encode_patches(images)
        maps = []
        for head, feats in zip(self.heads, patches):
            logits = head(feats).transpose(1, 2)  # (B, K, P)
            maps.append(logits.reshape(logits.shape[0], self.n_classes, gh, gw))  # (B, K, gh, gw)
        return maps
