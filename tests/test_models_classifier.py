"""SceneCNN teacher/student."""

from __future__ import annotations

import pytest
import torch

from ms2rgb.models.bands import RGB_BANDS, S2_BANDS, BandMismatchError
from ms2rgb.models.classifier import SceneCNN, SceneCNNConfig

WIDTH = 8  # small nets keep these tests to milliseconds on shared CPUs


def _teacher(width: int = WIDTH) -> SceneCNN:
    return SceneCNN(SceneCNNConfig(bands=S2_BANDS, width=width))


def _student(width: int = WIDTH) -> SceneCNN:
    cfg = SceneCNNConfig(bands=RGB_BANDS, width=width, from_8bit=True)
    return SceneCNN(cfg)


@pytest.mark.parametrize("side", [64, 32, 8])
def test_teacher_and_student_features_share_shape(side: int) -> None:
    torch.manual_seed(0)
    teacher, student = _teacher().eval(), _student().eval()
    ms = torch.rand(2, 13, side, side) * 3000
    rgb = torch.randint(0, 256, (2, 3, side, side), dtype=torch.uint8)
    f_t, f_s = teacher.encode(ms), student.encode(rgb)
    assert f_t.shape == f_s.shape == (2, 4 * WIDTH, 8, 8)
    assert teacher.feature_channels == 4 * WIDTH
    assert teacher.classify(f_t).shape == student(rgb).shape == (2, 10)


def test_rgb_tile_into_ms_model_raises_naming_bands() -> None:
    torch.manual_seed(0)
    with pytest.raises(BandMismatchError, match="B8A"):
        _teacher()(torch.rand(1, 3, 64, 64))


def test_tile_side_not_multiple_of_8_raises() -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        _teacher().encode(torch.rand(1, 13, 60, 60))


def test_default_width_size_is_small() -> None:
    # ~50-150k parameters: big enough for EuroSAT, small enough for CPU CI.
    n = sum(p.numel() for p in _teacher(width=32).parameters())
    assert 50_000 <= n <= 150_000


def test_input_layer_sized_from_band_list() -> None:
    assert _teacher().features[0][0].in_channels == len(S2_BANDS)
    assert _student().features[0][0].in_channels == len(RGB_BANDS)


def test_seeded_build_is_reproducible() -> None:
    x = torch.rand(2, 13, 32, 32) * 3000
    outs = []
    for _ in range(2):
        torch.manual_seed(7)
        outs.append(_teacher().eval()(x))
    torch.testing.assert_close(outs[0], outs[1])


def test_one_training_step_lowers_loss_on_fixed_batch() -> None:
    torch.manual_seed(0)
    model = _student()
    rgb = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(8) % 10
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(model(rgb), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_stride_two_stem_keeps_the_feature_shape() -> None:
    cfg = SceneCNNConfig(bands=S2_BANDS, width=WIDTH, stem_stride=2)
    fast = SceneCNN(cfg).eval()
    assert fast.encode(torch.rand(2, 13, 64, 64) * 3000).shape == (2, 4 * WIDTH, 8, 8)
    assert fast.features[0][0].stride == (2, 2) and _teacher().features[0][0].stride == (1, 1)
    with pytest.raises(ValueError, match="stem_stride=3"):
        SceneCNN(SceneCNNConfig(bands=S2_BANDS, stem_stride=3))
