"""Cross-modal matcher: embeddings, group InfoNCE, negative sampling, toy retrieval."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ms2rgb.models.bands import BAND_MEAN, BAND_STD, S2_BANDS, BandMismatchError
from ms2rgb.models.matcher import CrossModalMatcher, MatcherConfig, build_groups, group_contrastive_loss

SMALL = MatcherConfig(embed_dim=32, width=8)


def _toy_pairs(n: int, gen: torch.Generator, side: int = 16) -> tuple[torch.Tensor, ...]:
    """RGB (uint8 range) and MS (reflectance) tiles of n locations sharing a latent ramp.

    Each location has a latent z (3,): a horizontal ramp, a vertical ramp and an offset,
    rendered into both modalities with independent noise. Class = quadrant of z[:2].
    """
    z = torch.randn(n, 3, generator=gen)
    lin = torch.linspace(-1, 1, side)
    ramp_h, ramp_v = lin.view(1, 1, side), lin.view(1, side, 1)
    zz = z[:, :, None, None]  # (n, 3, 1, 1)
    pattern = zz[:, 0] * ramp_h + zz[:, 1] * ramp_v + 0.7 * zz[:, 2]  # (n, side, side)
    rgb_noise = 5 * torch.randn(n, 3, side, side, generator=gen)
    rgb = (128 + 40 * pattern[:, None] + rgb_noise).clamp(0, 255)
    mean = torch.tensor([BAND_MEAN[b] for b in S2_BANDS]).view(1, -1, 1, 1)
    std = torch.tensor([BAND_STD[b] for b in S2_BANDS]).view(1, -1, 1, 1)
    ms = mean + std * (0.8 * pattern[:, None] + 0.1 * torch.randn(n, 13, side, side, generator=gen))
    cls = (z[:, 0] > 0).long() * 2 + (z[:, 1] > 0).long()
    return rgb, ms, cls


def test_embeddings_are_unit_and_score_is_cosine() -> None:
    torch.manual_seed(0)
    m = CrossModalMatcher(SMALL).eval()
    r = m.embed_rgb(torch.randint(0, 256, (4, 3, 16, 16)).float())
    e = m.embed_ms(torch.rand(5, 13, 16, 16) * 3000)
    assert r.shape == (4, 32) and e.shape == (5, 32)
    torch.testing.assert_close(r.norm(dim=1), torch.ones(4))
    s = m.score(r, e)
    assert s.shape == (4, 5)
    torch.testing.assert_close(s[1, 2], F.cosine_similarity(r[1], e[2], dim=0))
    assert m.match(r, e).shape == (4,)


def test_towers_check_their_bands() -> None:
    m = CrossModalMatcher(SMALL)
    with pytest.raises(BandMismatchError):
        m.embed_rgb(torch.rand(1, 13, 16, 16))
    with pytest.raises(BandMismatchError):
        m.embed_ms(torch.rand(1, 3, 16, 16))


def test_group_loss_matches_hand_cross_entropy() -> None:
    torch.manual_seed(0)
    G, K, D, T = 3, 4, 8, 0.1
    rgb = F.normalize(torch.randn(G, D), dim=-1)
    pos = F.normalize(torch.randn(G, D), dim=-1)
    neg = F.normalize(torch.randn(G, K, D), dim=-1)
    loss = group_contrastive_loss(rgb, pos, neg, T)
    rows = [[rgb[g] @ pos[g]] + [rgb[g] @ neg[g, k] for k in range(K)] for g in range(G)]
    logits = torch.stack([torch.stack(r) for r in rows])  # (G, 1+K)
    expected = -F.log_softmax(logits / T, dim=1)[:, 0].mean()
    assert loss.shape == ()
    torch.testing.assert_close(loss, expected)
    # A perfect positive (pos == rgb, negatives orthogonal-ish) gives a smaller loss.
    assert group_contrastive_loss(rgb, rgb, neg, T) < loss


def test_group_loss_rejects_bad_shapes_and_temperature() -> None:
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="G, K, D"):
        group_contrastive_loss(x, x, torch.randn(2, 4), 0.1)
    with pytest.raises(ValueError, match="temperature"):
        group_contrastive_loss(x, x, torch.randn(2, 3, 4), 0.0)


def test_build_groups_picks_other_classes() -> None:
    gen = torch.Generator().manual_seed(0)
    rgb_cls = torch.tensor([0, 0, 1, 2, 2, 3])
    ms_cls = torch.tensor([0, 1, 1, 2, 3, 3, 0, 2])
    idx = build_groups(rgb_cls, ms_cls, n_neg=3, generator=gen)
    assert idx.shape == (6, 3) and idx.dtype == torch.long
    assert (ms_cls[idx] != rgb_cls[:, None]).all()
    # Enough candidates everywhere -> sampled without replacement.
    assert all(len(set(row.tolist())) == 3 for row in idx)
    again = build_groups(rgb_cls, ms_cls, 3, torch.Generator().manual_seed(0))
    assert torch.equal(idx, again)


def test_build_groups_needs_two_classes() -> None:
    cls = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="at least two scene classes"):
        build_groups(cls, cls, 2)


def test_matcher_retrieves_true_partner_on_toy_pairs() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    m = CrossModalMatcher(SMALL)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    for _ in range(60):
        rgb, ms, cls = _toy_pairs(32, gen)
        r, e = m.embed_rgb(rgb), m.embed_ms(ms)
        neg = build_groups(cls, cls, n_neg=4, generator=gen)  # (32, 4)
        loss = group_contrastive_loss(r, e, e[neg], m.cfg.temperature)
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    rgb, ms, _ = _toy_pairs(16, gen)  # held-out locations, never trained on
    with torch.no_grad():
        top1 = (m.match(m.embed_rgb(rgb), m.embed_ms(ms)) == torch.arange(16)).float().mean()
    assert top1 >= 0.8  # chance is 1/16
