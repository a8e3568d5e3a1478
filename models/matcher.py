"""Cross-modal matcher for method A step 2: which MS tile goes with which RGB tile.

Two small towers (RGB, MS) map tiles into one L2-normalised embedding space. Training
groups hold one true pair (same location) and K negatives of a *different* scene class
(docs/methods.md §A.2); the loss is InfoNCE over the 1+K candidates of each group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ms2rgb.models.bands import RGB_BANDS, S2_BANDS, BandNormalize, check_bands
from ms2rgb.models.classifier import SceneCNN, SceneCNNConfig


@dataclass(frozen=True)
class MatcherConfig:
    """Architecture of a ``CrossModalMatcher``."""

    rgb_bands: tuple[str, ...] = field(default=RGB_BANDS)  # RGB tower input (8-bit renders)
    ms_bands: tuple[str, ...] = field(default=S2_BANDS)  # MS tower input (reflectance)
    embed_dim: int = 64  # size of the shared embedding space (4 * teacher width with a teacher tower)
    width: int = 16  # channels of each tower's first stage
    temperature: float = 0.1  # InfoNCE temperature; CLIP-style contrastive default range
    stem_stride: int = 1  # stride of each tower's first conv; 2 quarters the full-resolution cost
    teacher: SceneCNNConfig | None = None  # set: the MS tower is this frozen teacher's encoder

    def __post_init__(self) -> None:
        if isinstance(self.teacher, dict):  # read back from a saved model.pt (asdict flattens it)
            cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in self.teacher.items()}
            object.__setattr__(self, "teacher", SceneCNNConfig(**cfg))
        if self.teacher is not None and self.embed_dim != 4 * self.teacher.width:
            raise ValueError(
                f"embed_dim={self.embed_dim}: with a teacher MS tower the embedding is the teacher's pooled "
                f"feature, so embed_dim must be 4 * teacher width = {4 * self.teacher.width}"
            )


class _Tower(nn.Module):
    """BandNormalize -> three conv stages -> global pool -> linear -> unit vector."""

    def __init__(self, bands: Sequence[str], from_8bit: bool, width: int, embed_dim: int, stem_stride: int = 1) -> None:
        super().__init__()
        w = width
        self.normalize = BandNormalize(check_bands(bands), from_8bit=from_8bit)
        self.body = nn.Sequential(
            nn.Conv2d(len(bands), w, 3, stride=stem_stride, padding=1, bias=False),
            nn.BatchNorm2d(w),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1, bias=False),
            nn.BatchNorm2d(4 * w),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),  # (B, 4w)
        )
        self.proj = nn.Linear(4 * w, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Unit length so that the dot product in ``score`` is a cosine similarity.
        return F.normalize(self.proj(self.body(self.normalize(x))), dim=-1)


class TeacherTower(nn.Module):
    """A frozen teacher's encoder as the MS tower: pooled (B, 4w) teacher features, unit length.

    Why (docs/methods.md §A.2): the teacher already separates the scene classes in this space, so
    an MS tile's embedding carries its class for free and only the RGB tower has to learn, from the
    few true pairs, to land next to its partner. Its BatchNorm stays in eval mode whatever
    ``train()`` says, and its weights never reach an optimiser (requires_grad is off).
    """

    def __init__(self, teacher: SceneCNN) -> None:
        super().__init__()
        self.teacher = teacher
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> TeacherTower:
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.teacher.encode(x).mean(dim=(2, 3)), dim=-1)  # (B, 4w)


class CrossModalMatcher(nn.Module):
    """RGB tower + MS tower sharing one cosine-similarity embedding space."""

    def __init__(self, cfg: MatcherConfig | None = None, teacher: SceneCNN | None = None) -> None:
        """With ``cfg.teacher`` set the MS tower is that teacher's encoder: pass the trained
        teacher, or nothing when the weights come from a saved matcher's state dict."""
        super().__init__()
        self.cfg = cfg or MatcherConfig()
        c = self.cfg
        # RGB tiles are stored as uint8 renders, so that tower undoes the 8-bit stretch.
        if c.stem_stride not in (1, 2):
            raise ValueError(f"stem_stride={c.stem_stride} is not supported; use 1 or 2")
        self.rgb_tower = _Tower(c.rgb_bands, True, c.width, c.embed_dim, c.stem_stride)
        self.ms_tower: nn.Module
        if c.teacher is None:
            self.ms_tower = _Tower(c.ms_bands, False, c.width, c.embed_dim, c.stem_stride)
        else:
            if teacher is not None and teacher.cfg != c.teacher:
                raise ValueError(f"the teacher's config {teacher.cfg} differs from the matcher's {c.teacher}")
            self.ms_tower = TeacherTower(teacher or SceneCNN(c.teacher))

    def embed_rgb(self, x: torch.Tensor) -> torch.Tensor:
        """(B, len(rgb_bands), H, W) uint8-range tiles -> (B, embed_dim) unit vectors."""
        return self.rgb_tower(x)

    def embed_ms(self, x: torch.Tensor) -> torch.Tensor:
        """(B, len(ms_bands), H, W) reflectance tiles -> (B, embed_dim) unit vectors."""
        return self.ms_tower(x)

    @staticmethod
    def score(rgb_emb: torch.Tensor, ms_emb: torch.Tensor) -> torch.Tensor:
        """(N, D) x (M, D) unit embeddings -> (N, M) cosine similarities."""
        return rgb_emb @ ms_emb.T

    def match(self, rgb_emb: torch.Tensor, ms_emb: torch.Tensor) -> torch.Tensor:
        """For each RGB embedding, the index of the best-matching MS embedding: (N,)."""
        return self.score(rgb_emb, ms_emb).argmax(dim=1)


class PairScorer(nn.Module):
    """Serving form of a matcher: RGB and MS tiles of a pair stacked on channels -> cosine score.

    A model registry signature describes one input tensor, so a pair travels as one
    (B, n_rgb + n_ms, H, W) tensor: the RGB bands first (8-bit range), then the MS bands.
    """

    def __init__(self, matcher: CrossModalMatcher) -> None:
        super().__init__()
        self.matcher = matcher
        self.n_rgb = len(matcher.cfg.rgb_bands)

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        """(B, n_rgb + n_ms, H, W) -> (B,) cosine similarity of each pair's embeddings."""
        rgb, ms = pairs[:, : self.n_rgb], pairs[:, self.n_rgb :]  # (B, n_rgb, H, W), (B, n_ms, H, W)
        return (self.matcher.embed_rgb(rgb) * self.matcher.embed_ms(ms)).sum(dim=-1)


def group_contrastive_loss(
    rgb_emb: torch.Tensor,
    pos_ms_emb: torch.Tensor,
    neg_ms_emb: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """InfoNCE over groups of one positive and K negatives; the positive sits at index 0.

    rgb_emb (G, D), pos_ms_emb (G, D), neg_ms_emb (G, K, D), all unit-normalised.
    Returns the mean cross-entropy over the G groups (a scalar).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    G, D = rgb_emb.shape
    bad_neg = neg_ms_emb.ndim != 3 or neg_ms_emb.shape[0] != G or neg_ms_emb.shape[2] != D
    if pos_ms_emb.shape != (G, D) or bad_neg:
        raise ValueError(
            f"expected rgb (G, D), pos (G, D), neg (G, K, D); got {tuple(rgb_emb.shape)}, "
            f"{tuple(pos_ms_emb.shape)}, {tuple(neg_ms_emb.shape)}"
        )
    pos = (rgb_emb * pos_ms_emb).sum(dim=-1, keepdim=True)  # (G, 1)
    neg = torch.einsum("gd,gkd->gk", rgb_emb, neg_ms_emb)  # (G, K)
    logits = torch.cat([pos, neg], dim=1) / temperature  # (G, 1+K)
    target = torch.zeros(G, dtype=torch.long, device=rgb_emb.device)
    return F.cross_entropy(logits, target)


def build_groups(
    rgb_classes: torch.Tensor,
    ms_classes: torch.Tensor,
    n_neg: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick K negative MS indices per true pair, each of a different scene class.

    rgb_classes (G,): class of pair i (RGB i and its same-location MS partner).
    ms_classes (M,): class of every MS tile that may serve as a negative (often the
    same batch's MS tiles, i.e. ``ms_classes is rgb_classes``).
    Returns a LongTensor (G, n_neg) of indices into ``ms_classes``. Sampling is without
    replacement when every group has at least ``n_neg`` candidates, else with it.
    """
    if n_neg < 1:
        raise ValueError(f"n_neg must be >= 1, got {n_neg}")
    allowed = rgb_classes.view(-1, 1) != ms_classes.view(1, -1)  # (G, M)
    counts = allowed.sum(dim=1)
    if (counts == 0).any():
        bad = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(
            f"pairs {bad} have no MS tile of a different class among {len(ms_classes)} "
            "candidates; draw batches that span at least two scene classes"
        )
    replacement = bool(counts.min() < n_neg)
    weights = allowed.float()  # uniform over the allowed candidates of each row
    return torch.multinomial(weights, n_neg, replacement=replacement, generator=generator)
