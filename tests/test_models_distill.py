"""Distillation losses, cross-modal attention and re-matching."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ms2rgb.models.bands import RGB_BANDS, S2_BANDS
from ms2rgb.models.classifier import SceneCNN, SceneCNNConfig
from ms2rgb.models.distill import (
    CrossModalAttention,
    DistillLoss,
    domain_shift_loss,
    js_divergence,
    kd_loss,
    self_training_loss,
)


def test_attention_returns_two_student_shaped_maps() -> None:
    torch.manual_seed(0)
    att = CrossModalAttention(16, heads=4)
    s, t = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 4, 4)  # teacher grid may differ
    first, second = att(s, t)
    assert first.shape == second.shape == (2, 16, 8, 8)


def test_attention_second_map_carries_teacher_information() -> None:
    # A teacher whose tokens are all equal: any attention mix of them returns that token.
    torch.manual_seed(0)
    att = CrossModalAttention(8, heads=2)
    token = torch.randn(2, 8, 1, 1)
    _, second = att(torch.randn(2, 8, 4, 4), token.expand(2, 8, 4, 4))
    torch.testing.assert_close(second, token.expand(2, 8, 4, 4))


def test_attention_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="divisible"):
        CrossModalAttention(10, heads=4)
    with pytest.raises(ValueError, match="equal B and C"):
        CrossModalAttention(8, heads=2)(torch.randn(2, 8, 4, 4), torch.randn(2, 4, 4, 4))


def test_domain_shift_zero_for_identical_and_grows_with_shift() -> None:
    torch.manual_seed(0)
    a = torch.randn(3, 8, 4, 4)
    assert domain_shift_loss(a, a.clone()).item() == 0.0
    small, large = domain_shift_loss(a, a + 0.3), domain_shift_loss(a, a + 3.0)
    assert 0 < small < large
    assert domain_shift_loss(a, a + 0.3).shape == ()
    with pytest.raises(ValueError, match="share"):
        domain_shift_loss(a, a[:, :4])


def test_domain_shift_gradient_is_finite_at_zero_distance() -> None:
    a = torch.randn(2, 4, 2, 2, requires_grad=True)
    domain_shift_loss(a, a.detach().clone()).backward()
    assert torch.isfinite(a.grad).all()


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_kd_loss_matches_hand_computation(T: float) -> None:
    torch.manual_seed(0)
    s, t = torch.randn(5, 10), torch.randn(5, 10)
    kl = F.kl_div(F.log_softmax(s / T, 1), F.softmax(t / T, 1), reduction="batchmean")
    expected = kl * T**2
    torch.testing.assert_close(kd_loss(s, t, T), expected)
    p_t = F.softmax(t / T, 1)
    by_hand = (p_t * (p_t.log() - F.log_softmax(s / T, 1))).sum(1).mean() * T**2
    torch.testing.assert_close(kd_loss(s, t, T), by_hand)


def test_kd_loss_temperature_behaviour() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(5, 10), torch.randn(5, 10)
    assert kd_loss(t, t, 3.0).abs() < 1e-6
    # Softer targets: the un-scaled KL shrinks with T, the T^2 factor compensates to O(1).
    raw = [kd_loss(s, t, T) / T**2 for T in (1.0, 4.0, 16.0)]
    assert raw[0] > raw[1] > raw[2]
    # In the high-T limit, T^2 * KL -> mean squared logit gap (centred) / (2 * C) (Hinton 2015).
    sc, tc = s - s.mean(1, keepdim=True), t - t.mean(1, keepdim=True)
    limit = ((sc - tc) ** 2).sum(1).mean() / (2 * 10)
    torch.testing.assert_close(kd_loss(s, t, 200.0), limit, rtol=0.02, atol=0)
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(s, t, 0.0)


def test_kd_loss_never_reaches_teacher() -> None:
    s, t = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    kd_loss(s, t, 2.0).backward()
    assert t.grad is None and s.grad is not None


def _pair_models() -> tuple[torch.nn.Module, torch.nn.Module]:
    teacher = SceneCNN(SceneCNNConfig(bands=S2_BANDS, width=8))
    cfg = SceneCNNConfig(bands=RGB_BANDS, width=8, from_8bit=True)
    student = SceneCNN(cfg)
    return teacher, student


def test_distill_gradients_reach_only_student_and_attention() -> None:
    torch.manual_seed(0)
    teacher, student = _pair_models()
    ms = torch.rand(4, 13, 32, 32) * 3000
    rgb = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3])
    loss_fn = DistillLoss(channels=32, w_feat=1.0, w_kd=1.0, w_ce=0.5, temperature=4.0)
    # Deliberately no torch.no_grad around the teacher: DistillLoss must detach on its own.
    t_feat = teacher.encode(ms)
    s_feat = student.encode(rgb)
    terms = loss_fn(s_feat, t_feat, student.classify(s_feat), teacher.classify(t_feat), labels)
    terms.total.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss_fn.parameters())
    expected = 1.0 * terms.feat + 1.0 * terms.kd + 0.5 * terms.ce
    torch.testing.assert_close(terms.total, expected)
    assert all(t.shape == () for t in (terms.total, terms.feat, terms.kd, terms.ce))


def test_distill_zero_weight_skips_term() -> None:
    torch.manual_seed(0)
    loss_fn = DistillLoss(channels=8, heads=2, w_feat=0.0, w_kd=1.0, w_ce=0.0)
    s_feat = torch.randn(2, 8, 4, 4, requires_grad=True)
    s_log = torch.randn(2, 5, requires_grad=True)
    terms = loss_fn(s_feat, torch.randn(2, 8, 4, 4), s_log, torch.randn(2, 5), labels=None)
    assert terms.feat == 0 and terms.ce == 0 and terms.kd > 0
    terms.total.backward()
    assert all(p.grad is None for p in loss_fn.parameters())  # attention was never run
    with pytest.raises(ValueError, match="labels"):
        DistillLoss(channels=8, heads=2, w_ce=1.0)(s_feat, s_feat, s_log, s_log, labels=None)
    with pytest.raises(ValueError, match="weights"):
        DistillLoss(channels=8, w_kd=-1.0)


def test_distill_without_teacher_needs_zero_teacher_weights() -> None:
    s_feat, s_log = torch.randn(2, 8, 4, 4), torch.randn(2, 5)
    labels = torch.tensor([0, 1])
    ce_only = DistillLoss(channels=8, heads=2, w_feat=0.0, w_kd=0.0, w_ce=1.0)(s_feat, None, s_log, None, labels)
    torch.testing.assert_close(ce_only.total, F.cross_entropy(s_log, labels))
    with pytest.raises(ValueError, match="teacher_feat is required"):
        DistillLoss(channels=8, heads=2, w_kd=0.0)(s_feat, None, s_log, None, labels)
    with pytest.raises(ValueError, match="teacher_logits are required"):
        DistillLoss(channels=8, heads=2, w_feat=0.0)(s_feat, None, s_log, None, labels)


def test_hidden_labels_get_no_cross_entropy() -> None:
    torch.manual_seed(0)
    loss_fn = DistillLoss(channels=8, heads=2, w_feat=0.0, w_kd=0.0, w_ce=1.0)
    s_feat, s_log = torch.randn(4, 8, 4, 4), torch.randn(4, 5, requires_grad=True)
    none_known = loss_fn(s_feat, None, s_log, None, torch.full((4,), -1))
    assert none_known.ce == 0 and none_known.total == 0
    some = loss_fn(s_feat, None, s_log, None, torch.tensor([2, -1, 0, -1]))
    torch.testing.assert_close(some.ce, F.cross_entropy(s_log[[0, 2]], torch.tensor([2, 0])))
    some.total.backward()
    assert s_log.grad is not None and (s_log.grad[[1, 3]] == 0).all() and (s_log.grad[[0, 2]] != 0).any()


def test_confidence_weights_scale_each_pair_and_zero_silences_it() -> None:
    torch.manual_seed(0)
    loss_fn = DistillLoss(channels=8, heads=2, w_feat=1.0, w_kd=1.0, w_ce=0.0)
    s_feat = torch.randn(3, 8, 4, 4, requires_grad=True)
    s_log = torch.randn(3, 5, requires_grad=True)
    t_feat, t_log = torch.randn(3, 8, 4, 4), torch.randn(3, 5)
    plain = loss_fn(s_feat, t_feat, s_log, t_log)
    weights = torch.tensor([1.0, 0.5, 0.0])
    weighted = loss_fn(s_feat, t_feat, s_log, t_log, weights=weights)
    per_pair = kd_loss(s_log, t_log, loss_fn.temperature, reduction="none")
    torch.testing.assert_close(weighted.kd, (per_pair * weights).mean())
    assert weighted.kd < plain.kd and weighted.feat < plain.feat
    weighted.total.backward()
    assert s_log.grad is not None and s_feat.grad is not None
    assert (s_log.grad[2] == 0).all() and (s_feat.grad[2] == 0).all()  # weight 0: the pair teaches nothing
    assert (s_log.grad[0] != 0).any() and (s_feat.grad[0] != 0).any()


def test_feature_loss_is_fp32_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    a, b = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    exact = domain_shift_loss(a, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = domain_shift_loss(a.bfloat16(), b.bfloat16())
    assert under.dtype == torch.float32
    torch.testing.assert_close(under, exact, rtol=2e-2, atol=1e-3)  # bf16 inputs, fp32 arithmetic


def test_self_training_counts_only_confident_tiles() -> None:
    weak = torch.tensor([[10.0, 0.0, 0.0], [0.1, 0.0, 0.0]])  # first confident (class 0), second not
    strong = torch.tensor([[0.0, 2.0, 0.0], [5.0, 0.0, 0.0]])
    loss = self_training_loss(strong, weak, threshold=0.95)
    torch.testing.assert_close(loss, F.cross_entropy(strong[:1], torch.tensor([0])) / 2)  # mean over both
    assert self_training_loss(strong, weak, threshold=1.0) == 0


def test_js_divergence_is_zero_on_equal_rows_symmetric_and_bounded() -> None:
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    q = torch.tensor([[0.0, 1.0], [0.5, 0.5]])
    d = js_divergence(p, q)
    assert d.shape == (2, 2) and d[1, 1].abs() < 1e-6
    torch.testing.assert_close(d[0, 0], torch.tensor(math.log(2)))  # disjoint supports: the maximum
    torch.testing.assert_close(js_divergence(q, p), d.T)


def test_js_divergence_in_chunks_equals_one_pass() -> None:
    torch.manual_seed(0)
    p, q = torch.rand(7, 4).softmax(1), torch.rand(5, 4).softmax(1)
    torch.testing.assert_close(js_divergence(p, q, max_chunk_elems=20), js_divergence(p, q))  # 1 row per chunk
