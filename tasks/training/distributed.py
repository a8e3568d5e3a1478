"""Data-parallel training across processes (params.yaml `compute.nproc`), started by `torchrun`.

With `compute.nproc` > 1 the stage runner starts a distributed stage (`DISTRIBUTED_STAGES`) as
`torchrun --standalone --nproc_per_node N -m ms2rgb.flows.torchrun_stage NAME ROOT`. Every process runs the
same stage code on the same data; the `Trainer` cuts each global batch into one contiguous slice
per process (`local_rows`), each process computes its slice's loss, and the gradients are summed
across processes before every optimiser step, so the weights stay identical on every process and
follow the one-process run on the same global batch. Only process 0 (`is_writer`) logs, writes
checkpoints, models and reports, and registers.

Why not `DistributedDataParallel`: the steps call `encode`/`classify` and the loss modules
directly, not one `forward`, which DDP's hooks expect; one flat all-reduce of the gradients after
`backward` is the same arithmetic without that constraint.

Batch norm: statistics of a slice are not those of the global batch, and torch's SyncBatchNorm runs
on CUDA only; `synced_batch_norm` gives every BatchNorm2d the global batch's mean and variance
through a differentiable all-reduce, on CPU (gloo) and CUDA (NCCL) alike.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

# Stages whose training spreads over compute.nproc processes. Of the detector, only the prompt tuning
# is split: every process runs the rest of it (the backbone's pretraining, the baselines) whole.
DISTRIBUTED_STAGES = ("teacher", "student", "detector")


def world_size() -> int:
    """Processes training together: torchrun's WORLD_SIZE, 1 outside it."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's place among them (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0"))


def is_writer() -> bool:
    """Only process 0 logs, writes files and registers models; the others only train."""
    return rank() == 0


def under_torchrun() -> bool:
    """True in a process torchrun started (it sets TORCHELASTIC_RUN_ID for every worker)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def join(device: torch.device) -> None:
    """Join the process group torchrun set up (gloo on CPU, NCCL on CUDA); nothing for one process."""
    if world_size() > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def leave() -> None:
    """Leave the process group (each process, at the end of its stage)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    """True when gradients and statistics must be summed across processes."""
    return world_size() > 1 and dist.is_initialized()


def rows_of(n_rows: int, process: int, processes: int) -> slice:
    """Process `process`'s contiguous slice of a batch of `n_rows` cut for `processes` (sizes differ
    by one at most, the larger first)."""
    base, extra = divmod(n_rows, processes)
    begin = process * base + min(process, extra)
    return slice(begin, begin + base + (process < extra))


def local_rows(n_rows: int) -> slice:
    """This process's slice of a global batch of `n_rows`: all of it in one process."""
    return rows_of(n_rows, rank(), world_size()) if active() else slice(0, n_rows)


def local_share(n_rows: int) -> float:
    """This process's share of a global batch: the weight of its slice's mean loss, so that the summed
    gradients are those of the mean over the whole batch."""
    rows = local_rows(n_rows)
    return (rows.stop - rows.start) / n_rows


def sum_gradients(module: nn.Module) -> None:
    """Sum every parameter's gradient across processes, in one all-reduce of one flat buffer."""
    if not active():
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])  # (sum of numels,)
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def sum_numbers(values: list[float]) -> list[float]:
    """The same numbers summed over every process (losses, counts of an epoch's statistics)."""
    if not active():
        return values
    total = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(total)
    return total.tolist()


def broadcast_module(module: nn.Module) -> None:
    """Process 0's parameters and buffers to every process: all start from the same weights even
    if something drew from a generator on one process only."""
    if not active():
        return
    for tensor in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(tensor.data, src=0)


def barrier() -> None:
    """Wait for every process (e.g. until process 0 has written what the others read)."""
    if active():
        dist.barrier()


class _SumOverProcesses(torch.autograd.Function):
    """A sum over every process that gradients flow through: each process's output depends on every
    process's input, so the gradient of an input is the sum of every process's output gradient."""

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor) -> torch.Tensor:
        total = local.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone()
        dist.all_reduce(total)
        return total


def sum_over_processes(local: torch.Tensor) -> torch.Tensor:
    """`local` summed over every process, differentiable (torch.distributed.nn's is deprecated)."""
    return _SumOverProcesses.apply(local)


class CrossProcessBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch over every process.

    Two passes (sum and count, then squared deviations), each one all-reduce, as a one-process
    BatchNorm2d computes mean then variance; the all-reduce is differentiable, so gradients flow to
    every process's inputs as in one process. Eval mode and one process are plain BatchNorm2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W), this process's slice
        if not (self.training and active()):
            return super().forward(x)
        channels = x.shape[1]
        count = torch.full((1,), x.numel() / channels, dtype=x.dtype, device=x.device)
        sums = sum_over_processes(torch.cat([x.sum((0, 2, 3)), count]))  # (C + 1,)
        n = sums[channels]
        mean = sums[:channels] / n  # (C,)
        centred = x - mean.view(1, -1, 1, 1)
        var = sum_over_processes((centred * centred).sum((0, 2, 3))) / n  # (C,) biased, as BatchNorm normalises
        self._update_running_stats(mean.detach(), var.detach() * n.detach() / (n.detach() - 1))
        scale = torch.rsqrt(var + self.eps)
        if self.affine:
            return centred * (self.weight * scale).view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return centred * scale.view(1, -1, 1, 1)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        if not self.track_running_stats or self.running_mean is None or self.running_var is None:
            return
        assert self.num_batches_tracked is not None, "tracked statistics come with a counter"
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased_var, alpha=factor)


@contextmanager
def synced_batch_norm(module: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every BatchNorm2d of `module` normalises with the global batch's statistics.

    The instances change class in place and back (same parameters, buffers and state-dict keys), so
    checkpoints, the saved model and a pickled registry model are those of plain BatchNorm2d.
    """
    changed = [m for m in module.modules() if type(m) is nn.BatchNorm2d] if active() else []
    for m in changed:
        m.__class__ = CrossProcessBatchNorm2d
    try:
        yield module
    finally:
        for m in changed:
            m.__class__ = nn.BatchNorm2d
