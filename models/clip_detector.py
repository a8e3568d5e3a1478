"""Serving wrappers around a (prompted) open_clip CLIP, fed 8-bit RGB tiles as stored (docs/methods.md §B.4).

The prepared cache and GeoTIFFs hold RGB as 0..255; CLIPs expect [0, 1] pixels z-scored with
the statistics their weights were trained with. ``ClipPixels`` does that scaling in the model,
so a registered model's input is plain RGB and no caller can forget the normalisation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from ms2rgb.models.clip_prompt import PromptConfig, PromptedCLIP
from ms2rgb.models.pixel_evidence import PixelEvidence, empty_evidence


class ClipPixels(nn.Module):
    """(B, 3, H, W) RGB in 0..255 -> the CLIP's normalised float input at its image size.

    Tiles are resized (bilinear) to the size the CLIP was trained at, e.g. 64 px tiles to 224
    for ViT-B-32 so its 32-px patches still give a 7x7 grid; for the tiny config it is a no-op.
    """

    mean: torch.Tensor  # buffers, registered in __init__
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float], size: tuple[int, int]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1))
        self.size = (int(size[0]), int(size[1]))

    @classmethod
    def for_clip(cls, clip: open_clip.CLIP) -> ClipPixels:
        """Use the mean/std open_clip attached to the model (they follow the pretrained tag)."""
        cfg = getattr(clip.visual, "preprocess_cfg", None) or {}
        return cls(
            cfg.get("mean", open_clip.OPENAI_DATASET_MEAN),
            cfg.get("std", open_clip.OPENAI_DATASET_STD),
            clip.visual.image_size,
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected RGB images (B, 3, H, W) in 0..255, got shape {tuple(images.shape)}")
        x = (images.float() / 255.0 - self.mean) / self.std
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        return x


class ClassMapDetector(nn.Module):
    """A tuned PromptedCLIP with its class descriptions baked in: RGB 0..255 -> logits (B, K, H, W).

    With ``evidence`` (a per-pixel expert fitted on the shots, ``models/pixel_evidence.py``) the
    map is the CLIP's upsampled logits plus ``evidence_weight`` times each class's pixel log-score;
    the weight trains with the prompts (:meth:`trainable_parameters`), the expert stays as fitted.

    ``class_names`` / ``texts`` / ``clip_model`` travel with the pickled model so a loaded
    registry version can say what it detects and re-tokenise other descriptions
    (``open_clip.get_tokenizer(clip_model)``) for :meth:`logits_for`; ``pixel_size_m``, the ground
    sample distance of its training tiles, lets a caller check that an image matches it.
    """

    text_tokens: torch.Tensor  # buffer, registered in __init__

    def __init__(
        self,
        prompted: PromptedCLIP,
        text_tokens: torch.Tensor,
        class_names: Sequence[str],
        texts: Sequence[str],
        clip_model: str,
        pixel_size_m: float | None = None,
        evidence: PixelEvidence | None = None,
        evidence_weight: float = 0.3,
    ) -> None:
        super().__init__()
        if len(class_names) != text_tokens.shape[0] or len(texts) != len(class_names):
            raise ValueError(
                f"{len(class_names)} class names and {len(texts)} texts for {text_tokens.shape[0]} token rows; "
                f"give one name and one description per tokenised class"
            )
        self.prompted = prompted
        self.pixels = ClipPixels.for_clip(prompted.clip)
        self.register_buffer("text_tokens", text_tokens.long())
        self.class_names, self.texts, self.clip_model = list(class_names), list(texts), clip_model
        self.pixel_size_m = pixel_size_m  # GSD (m) of the tiles it was tuned on; None: unknown
        self.evidence = evidence
        self.evidence_weight = nn.Parameter(torch.tensor(float(evidence_weight))) if evidence is not None else None

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What tuning moves: the prompts (and projections), and the pixel evidence's weight if any."""
        weight = [self.evidence_weight] if self.evidence_weight is not None else []
        return self.prompted.trainable_parameters() + weight

    @property
    def num_trainable(self) -> int:
        return self.prompted.num_trainable + (1 if self.evidence_weight is not None else 0)

    def tuned_state_dict(self) -> dict[str, torch.Tensor]:
        """The part of the state that tuning and fitting produced: prompts, evidence and its weight."""
        state = {f"prompted.{k}": v for k, v in self.prompted.prompt_state_dict().items()}
        if self.evidence is not None and self.evidence_weight is not None:
            state |= {f"evidence.{k}": v for k, v in self.evidence.state_dict().items()}
            state["evidence_weight"] = self.evidence_weight.detach()
        return state

    def logits_for(self, images: torch.Tensor, text_tokens: torch.Tensor) -> torch.Tensor:
        """Class logits (B, K', H, W) of the CLIP alone at the input's size for other tokenised class
        descriptions (the pixel evidence knows the tuned classes only)."""
        logits = self.prompted(self.pixels(images), text_tokens)  # (B, K', S, S) at the CLIP's size
        if logits.shape[-2:] != images.shape[-2:]:
            logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return logits

    def forward(self, images: torch.Tensor, evidence: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, K, H, W) of the tuned classes; ``evidence``: the pixel log-likelihoods of these
        images when the caller computed them already (tuning does, once per shot)."""
        logits = self.logits_for(images, self.text_tokens)
        if self.evidence is None or self.evidence_weight is None:
            return logits
        loglik = self.evidence(images) if evidence is None else evidence
        return logits + self.evidence_weight * loglik


class ImageEmbedder(nn.Module):
    """A CLIP's image tower for the registry: RGB 0..255 (B, 3, H, W) -> L2-normalised (B, D)."""

    def __init__(self, clip: open_clip.CLIP) -> None:
        super().__init__()
        self.clip = clip
        self.pixels = ClipPixels.for_clip(clip)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.encode_image(self.pixels(images)), dim=-1)


def detector_from_payload(
    payload: Mapping[str, Any],
    clip: nn.Module,
    tokenizer: Callable[..., torch.Tensor],
    pixel_size_m: float | None,
) -> ClassMapDetector:
    """The ClassMapDetector a saved detector.pt payload describes, around the CLIP its weights were loaded into.

    Raises ValueError when the saved prompts do not fit the payload's prompt config. A payload without
    ``pixel_evidence`` (written before it existed) gives the CLIP's map alone.
    """
    prompted = PromptedCLIP(clip, PromptConfig(**payload["prompt_config"]))
    result = prompted.load_state_dict(payload["prompt_state"], strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("clip.")]  # the CLIP came from its own file
    if missing or result.unexpected_keys:
        raise ValueError(f"does not fit its prompt config (missing {missing}, unexpected {result.unexpected_keys})")
    evidence, weight = None, 0.0
    saved = payload.get("pixel_evidence")
    if saved is not None:
        evidence = empty_evidence(saved, len(payload["class_names"]))
        evidence.load_state_dict(saved["state"])
        weight = saved["weight"]
    return ClassMapDetector(
        prompted,
        tokenizer(payload["texts"]),
        payload["class_names"],
        payload["texts"],
        payload["clip_model"],
        pixel_size_m,
        evidence=evidence,
        evidence_weight=weight,
    )
