"""Dihedral augmentation: the 8 flips/rotations of a square tile, one per sample.

Overhead views have no up or left, so the 8 symmetries of the square are free extra data. One
geometric core (`apply_dihedral`) applies symmetry k to every tensor of a tuple, so true pairs
(the matcher) or an image and its mask (the detector) stay aligned. `random_dihedral` draws k per
sample from the caller's generator, in the caller's own stream: a torch Generator for the
training loop (teacher, matcher, student), a numpy Generator for the detector (whose checkpoints
store that numpy state). Keeping each caller's generator type keeps its random draws, and so its
metrics, exactly as they were.
"""

from __future__ import annotations

import numpy as np
import torch

N_SYMMETRIES = 8  # code k: rotate by (k % 4) quarter turns, then mirror when k >= 4; 0 = identity


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """Symmetry `k` of the last two axes of `x`."""
    x = torch.rot90(x, k % 4, dims=(-2, -1))
    return x.flip(-1) if k >= 4 else x


def apply_dihedral(tensors: tuple[torch.Tensor, ...], codes: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, ...]:
    """Apply symmetry codes[i] to sample i of every tensor of the tuple; the inputs are left alone."""
    codes = torch.as_tensor(codes)
    out = [t.clone() for t in tensors]
    for k in range(1, N_SYMMETRIES):
        rows = torch.nonzero(codes == k).flatten()
        if len(rows) == 0:
            continue
        for src, dst in zip(tensors, out):
            dst[rows] = dihedral(src[rows], k)
    return tuple(out)


def random_dihedral(
    tensors: tuple[torch.Tensor, ...], generator: torch.Generator | np.random.Generator
) -> tuple[torch.Tensor, ...]:
    """One random symmetry per sample, the same one for every tensor of the tuple.

    The codes come from `generator` in one draw of len(tensors[0]) values: `torch.randint` for a
    torch Generator, `Generator.integers` for a numpy one.
    """
    n = tensors[0].shape[0]
    codes: np.ndarray | torch.Tensor
    if isinstance(generator, np.random.Generator):
        codes = generator.integers(0, N_SYMMETRIES, n)
    else:
        codes = torch.randint(0, N_SYMMETRIES, (n,), generator=generator)
    return apply_dihedral(tensors, codes)


def strong_augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """FixMatch's strong view of (B, 3, H, W) 0..255 RGB tiles: a dihedral symmetry, per-channel gain,
    brightness and contrast jitter, sensor noise, and one cut-out square filled with mid grey.

    Photometric changes that RGB imagery really shows (sun angle, haze, sensor gain); no hue
    rotation, which would turn vegetation into something else.
    """
    (x,) = random_dihedral((x,), generator)
    b, c, h, w = x.shape

    def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(shape, generator=generator)

    mean = x.mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    x = (x - mean) * uniform(0.7, 1.3, b, 1, 1, 1) + mean * uniform(0.7, 1.3, b, 1, 1, 1)
    x = x * uniform(0.9, 1.1, b, c, 1, 1) + 8.0 * torch.randn(x.shape, generator=generator)
    side = max(1, h // 4)
    top, left = (
        torch.randint(0, h - side + 1, (b,), generator=generator),
        torch.randint(0, w - side + 1, (b,), generator=generator),
    )
    rows, cols = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
    hole = (rows >= top.view(b, 1, 1)) & (rows < (top + side).view(b, 1, 1))
    hole = hole & (cols >= left.view(b, 1, 1)) & (cols < (left + side).view(b, 1, 1))  # (B, H, W)
    x = torch.where(hole.unsqueeze(1), torch.full_like(x, 127.5), x)
    return x.clamp(0, 255)
