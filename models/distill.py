"""Losses for method A steps 5-6: MS teacher -> RGB student distillation and re-matching.

The teacher is frozen; every teacher tensor entering a loss here is detached, so a
caller that forgot ``torch.no_grad`` still cannot leak gradients into it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn


class CrossModalAttention(nn.Module):
    """Student tokens attend over the paired teacher's tokens (docs/methods.md §A.4).

    Returns two maps shaped like the student's (B, C, h, w):
    1. ``first``: the student features through a learned 1x1 projection (student side);
    2. ``second``: teacher information re-expressed at student positions, i.e. for each
       student position a convex combination of teacher tokens chosen by attention.

    Queries and keys are projected per head; values are the raw teacher tokens. Why no
    value/output projection: with learned maps on both sides the cheapest way to drive
    the domain-shift loss to zero is to shrink both to zero. Keeping the second map a
    mixture of actual (frozen) teacher features anchors it, so only the student side
    can move towards the teacher, never the target towards the student.
    """

    def __init__(self, channels: int, heads: int = 4) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"channels ({channels}) must be divisible by heads ({heads})")
        self.channels, self.heads = channels, heads
        self.q_proj = nn.Linear(channels, channels)
        self.k_proj = nn.Linear(channels, channels)
        self.student_proj = nn.Linear(channels, channels)

    def _split(self, tokens: torch.Tensor) -> torch.Tensor:
        B, T, C = tokens.shape
        hs = C // self.heads
        return tokens.view(B, T, self.heads, hs).transpose(1, 2)  # (B, nh, T, hs)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """student (B, C, h, w), teacher (B, C, h', w') -> two (B, C, h, w) maps."""
        if student.ndim != 4 or teacher.ndim != 4 or student.shape[:2] != teacher.shape[:2]:
            raise ValueError(
                f"student and teacher maps must be (B, C, h, w) with equal B and C="
                f"{self.channels}; got {tuple(student.shape)} and {tuple(teacher.shape)}"
            )
        B, C, h, w = student.shape
        s_tok = student.flatten(2).transpose(1, 2)  # (B, h*w, C)
        t_tok = teacher.detach().flatten(2).transpose(1, 2)  # (B, h'*w', C)
        q = self._split(self.q_proj(s_tok))  # (B, nh, h*w, hs)
        k = self._split(self.k_proj(t_tok))  # (B, nh, h'*w', hs)
        v = self._split(t_tok)  # (B, nh, h'*w', hs)
        att = F.scaled_dot_product_attention(q, k, v)  # (B, nh, h*w, hs)
        second = att.transpose(1, 2).reshape(B, h * w, C)  # (B, h*w, C)
        second = second.transpose(1, 2).reshape(B, C, h, w)  # (B, C, h, w)
        first = self.student_proj(s_tok).transpose(1, 2).reshape(B, C, h, w)  # (B, C, h, w)
        return first, second


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances between token sets a (B, n, C) and b (B, m, C) -> (B, n, m).

    The Gram form is one batched matmul instead of a (B, n, m, C) difference tensor, about
    10x cheaper on CPU. Rounding can make it slightly negative, hence the clamp.
    """
    sq_a, sq_b = a.pow(2).sum(-1), b.pow(2).sum(-1)  # (B, n), (B, m)
    return (sq_a.unsqueeze(2) + sq_b.unsqueeze(1) - 2 * a @ b.transpose(1, 2)).clamp_min(0)


def _rbf_mmd2(x: torch.Tensor, y: torch.Tensor, scales: tuple[float, ...]) -> torch.Tensor:
    """Biased MMD^2 per sample between token sets x (B, n, C) and y (B, m, C) -> (B,)."""
    # Each block is computed on its own, so for y == x the three blocks are bitwise equal and
    # identical inputs give exactly zero.
    dxx, dyy, dxy = _sq_dists(x, x), _sq_dists(y, y), _sq_dists(x, y)  # (B, n, n), (B, m, m), (B, n, m)
    # Median heuristic per sample over the cross distances, detached: the bandwidth is a yardstick,
    # not a target. The cross block alone is a quarter of the pairs, so its median costs a quarter of
    # the sort that dominated a training step, and it is the scale at which x and y are compared.
    base = dxy.detach().flatten(1).median(dim=1).values.clamp_min(1e-6).view(-1, 1, 1)

    def kernel_mean(d2: torch.Tensor) -> torch.Tensor:
        # sum() of tensors is a tensor (scales is never empty); typeshed types it as Tensor | Literal[0]
        return cast(torch.Tensor, sum(torch.exp(-d2 / (s * base)) for s in scales)).mean(dim=(1, 2))  # (B,)

    return kernel_mean(dxx) + kernel_mean(dyy) - 2 * kernel_mean(dxy)


def domain_shift_loss(
    a: torch.Tensor, b: torch.Tensor, scales: tuple[float, ...] = (0.25, 1.0, 4.0), reduction: str = "mean"
) -> torch.Tensor:
    """Multi-bandwidth RBF MMD^2 between two (B, C, h, w) maps: the batch mean, or (B,) with reduction="none".

    Why MMD rather than CORAL or normalised MSE: pairs in this method share a scene
    class, not a location, so position-by-position agreement (MSE) would ask the
    student to reproduce a layout its RGB tile does not have. The closest public work
    (SemBridge) aligns the modalities as distributions (optimal transport); MMD is the
    distribution-level loss of the three, and unlike CORAL it sees more than second
    moments. It is computed per pair over its h*w tokens, so each student tile is held
    to its own teacher tile. Several bandwidths around the median distance keep the
    loss informative whether the maps are far apart (early) or close (late). Always
    computed in fp32: under bf16 autocast the Gram-form distances lose too many digits.
    """
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"maps must share a (B, C, h, w) shape; got {tuple(a.shape)}, {tuple(b.shape)}")
    with torch.autocast(a.device.type, enabled=False):
        x = a.float().flatten(2).transpose(1, 2)  # (B, h*w, C)
        y = b.float().flatten(2).transpose(1, 2)  # (B, h*w, C)
        # Clamp: the biased estimator is >= 0 in exact arithmetic, rounding can dip below.
        per_sample = _rbf_mmd2(x, y, scales).clamp_min(0)  # (B,)
    return per_sample if reduction == "none" else per_sample.mean()


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, reduction: str = "mean"
) -> torch.Tensor:
    """Hinton KD: KL(teacher_T || student_T) * T^2, the batch mean (or (B,) with reduction="none");
    the teacher is detached.

    The T^2 factor keeps the gradient magnitude comparable across temperatures.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(-1)  # (B,)
    per_sample = kl * temperature**2
    return per_sample if reduction == "none" else per_sample.mean()


def self_training_loss(strong_logits: torch.Tensor, weak_logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """FixMatch: cross-entropy of the strong view against the weak view's confident argmax -> scalar.

    Tiles under `threshold` confidence count as zero, and the mean runs over all tiles given, as
    in FixMatch, so a batch with few confident tiles pulls little.
    """
    probs = weak_logits.detach().float().softmax(-1)
    confidence, pseudo = probs.max(-1)
    ce = F.cross_entropy(strong_logits.float(), pseudo, reduction="none")
    return (ce * (confidence >= threshold).float()).mean()


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean over the batch of per-sample values, each scaled by its weight (confidence) when given."""
    return values.mean() if weights is None else (values * weights.to(values.dtype)).mean()


@dataclass
class LossTerms:
    """Weighted total and the unweighted terms, for logging."""

    total: torch.Tensor
    feat: torch.Tensor
    kd: torch.Tensor
    ce: torch.Tensor


class DistillLoss(nn.Module):
    """Student loss of docs/methods.md §A.5: feature (attention + domain shift) + KD + CE."""

    def __init__(
        self,
        channels: int,
        w_feat: float = 1.0,
        w_kd: float = 1.0,
        w_ce: float = 1.0,
        temperature: float = 4.0,
        heads: int = 4,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if min(w_feat, w_kd, w_ce) < 0:
            raise ValueError(f"loss weights must be >= 0; got {w_feat=}, {w_kd=}, {w_ce=}")
        self.attention = CrossModalAttention(channels, heads)
        self.w_feat, self.w_kd, self.w_ce = w_feat, w_kd, w_ce
        self.temperature, self.label_smoothing = temperature, label_smoothing

    def forward(
        self,
        student_feat: torch.Tensor,
        teacher_feat: torch.Tensor | None,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor | None,
        labels: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> LossTerms:
        """A weight of 0 skips its term (reported as 0) and lets its input be None: a student
        without a teacher (the RGB-only baseline) passes None for both teacher tensors.

        `labels` of -1 are unlabelled tiles: they get no cross-entropy (the mean runs over the
        labelled ones). `weights` (B,) scale each pair's feature and KD terms (its confidence).
        """
        zero = student_logits.new_zeros((), dtype=torch.float32)
        feat = kd = ce = zero
        if self.w_feat > 0:
            if teacher_feat is None:
                raise ValueError("teacher_feat is required when w_feat > 0; pass it or set w_feat=0")
            first, second = self.attention(student_feat, teacher_feat.detach())
            feat = _weighted_mean(domain_shift_loss(first, second, reduction="none"), weights)
        if self.w_kd > 0:
            if teacher_logits is None:
                raise ValueError("teacher_logits are required when w_kd > 0; pass them or set w_kd=0")
            kd = _weighted_mean(
                kd_loss(student_logits, teacher_logits.detach(), self.temperature, reduction="none"), weights
            )
        if self.w_ce > 0:
            if labels is None:
                raise ValueError("labels are required when w_ce > 0; pass them or set w_ce=0")
            known = labels >= 0
            if bool(known.any()):
                ce = F.cross_entropy(student_logits[known].float(), labels[known], label_smoothing=self.label_smoothing)
        total = self.w_feat * feat + self.w_kd * kd + self.w_ce * ce
        return LossTerms(total=total, feat=feat, kd=kd, ce=ce)


def js_divergence(p: torch.Tensor, q: torch.Tensor, max_chunk_elems: int = 1 << 24) -> torch.Tensor:
    """Jensen-Shannon divergence (nats) between every row of p (n, C) and q (M, C) -> (n, M).

    Rows of p go in chunks of about `max_chunk_elems` / (M * C), so the (rows, M, C) mixture stays
    near 64 MB however large the pool grows."""
    h_q = -torch.special.xlogy(q, q).sum(-1)  # (M,)
    rows = max(1, max_chunk_elems // max(1, q.shape[0] * q.shape[1]))
    out = []
    for chunk in p.split(rows):
        m = 0.5 * (chunk.unsqueeze(1) + q.unsqueeze(0))  # (rows, M, C)
        # JS = H(m) - (H(p) + H(q)) / 2; xlogy gives 0*log0 = 0 for one-hot teachers.
        h_m = -torch.special.xlogy(m, m).sum(-1)  # (rows, M)
        h_p = -torch.special.xlogy(chunk, chunk).sum(-1)  # (rows,)
        out.append(h_m - 0.5 * (h_p.unsqueeze(1) + h_q.unsqueeze(0)))
    return torch.cat(out) if out else p.new_zeros((0, q.shape[0]))
