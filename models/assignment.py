"""Balanced assignment of RGB tiles to MS tiles (docs/methods.md §A.3, §A.6).

Taking each RGB tile's single best MS tile lets a few "hub" tiles absorb most matches: a tile
whose embedding or class distribution sits at the centre of its class is everybody's nearest
neighbour. An entropic optimal-transport plan (Sinkhorn) with uniform marginals asks every MS tile
to take an equal share of the RGB tiles, so partners spread over the pool; each row of the plan is
then a distribution over MS tiles, whose mass per teacher class is the matcher's class posterior.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def sinkhorn_plan(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """(N, M) affinities (higher = better, e.g. score / temperature) -> (N, M) plan, each row a distribution.

    Log-domain Sinkhorn with uniform marginals (rows 1/N, columns 1/M), `iters` rounds; the
    returned rows are renormalised to sum to 1 (the plan conditioned on the RGB tile).
    """
    if logits.ndim != 2 or 0 in logits.shape:
        raise ValueError(f"logits must be a non-empty (N, M) matrix, got {tuple(logits.shape)}")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    z = logits.float()
    n, m = z.shape
    log_a, log_b = -torch.log(torch.tensor(float(n))), -torch.log(torch.tensor(float(m)))
    f, g = z.new_zeros(n), z.new_zeros(m)
    for _ in range(iters):
        f = log_a - torch.logsumexp(z + g.unsqueeze(0), dim=1)  # (N,)
        g = log_b - torch.logsumexp(z + f.unsqueeze(1), dim=0)  # (M,)
    log_plan = z + f.unsqueeze(1) + g.unsqueeze(0)  # (N, M)
    return (log_plan - torch.logsumexp(log_plan, dim=1, keepdim=True)).exp()


def class_posterior(plan: torch.Tensor, classes: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(N, M) row-stochastic plan, (M,) class of each MS tile -> (N, n_classes) mass per class."""
    onehot = torch.nn.functional.one_hot(classes.long(), n_classes).to(plan.dtype)  # (M, n_classes)
    return plan @ onehot
