"""The torch device is a param (`compute.device`): auto picks CUDA when torch sees one, a named device
that is not there stops with the key and the fix, and checkpoints carry the CUDA generators so a
resumed GPU run draws what the uninterrupted one would. Tests marked `gpu` run where CUDA is present."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_params import repo_params
from torch import nn

from ms2rgb.tasks.errors import Ms2rgbError, ParamsError
from ms2rgb.tasks.training.loop import DeviceChoice, FitConfig, Trainer, pick_device, resolve_device, use_device

NO_CUDA = not torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _device_back_to_auto() -> object:
    yield
    DeviceChoice.requested = "auto"


def test_auto_is_cuda_exactly_when_torch_sees_one_and_cpu_is_always_there() -> None:
    assert resolve_device("auto").type == ("cpu" if NO_CUDA else "cuda")
    use_device("cpu")
    assert pick_device() == torch.device("cpu")


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
def test_cuda_asked_for_without_one_names_the_key_and_the_fix() -> None:
    with pytest.raises(Ms2rgbError, match=r"compute.device: cuda .*set compute.device: auto or cpu"):
        use_device("cuda")
    assert DeviceChoice.requested == "auto"  # a refused choice changes nothing


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "CPU", ""])
def test_a_device_name_torch_does_not_know_is_refused_by_the_params_check(bad: str) -> None:
    with pytest.raises(ParamsError, match="compute.device"):
        repo_params(compute__device=bad)


def trained(checkpoints: Path, epochs: int, resume: bool = False) -> tuple[Trainer, nn.Module]:
    """A seeded linear model trained for `epochs` of a 3-epoch run, checkpointed after each epoch."""
    torch.manual_seed(0)
    device = pick_device()
    module = nn.Linear(4, 2).to(device)
    x, y = torch.randn(32, 4, generator=torch.Generator().manual_seed(1)).to(device), torch.arange(32).to(device) % 2
    trainer = Trainer(module, 32, FitConfig(epochs=3, batch_size=8, lr=0.01, weight_decay=0.0), seed=0, epochs=3,
                      checkpoint_dir=checkpoints, fingerprint="device-test")  # fmt: skip

    def step(idx: np.ndarray) -> tuple[torch.Tensor, int, int]:
        noise = 0.01 * torch.randn(len(idx), 4, device=device)  # a draw from the device's own generator
        loss = nn.functional.cross_entropy(module(x[idx] + noise), y[idx])
        return loss, 0, 0

    if resume:
        trainer.resume()
    for _ in range(epochs - len(trainer.history)):
        trainer.run_epoch(step)
        trainer.save_checkpoint()
    return trainer, module


def test_a_cpu_checkpoint_resumes_to_the_uninterrupted_weights_and_saves_no_cuda_generators(tmp_path: Path) -> None:
    use_device("cpu")
    _, whole = trained(tmp_path / "whole", 3)
    trained(tmp_path / "killed", 1)
    saved = torch.load(next((tmp_path / "killed").glob("epoch_*.pt")), weights_only=True)
    assert saved["cuda_rng"] == []
    _, resumed = trained(tmp_path / "killed", 3, resume=True)
    assert torch.equal(whole.weight, resumed.weight) and torch.equal(whole.bias, resumed.bias)


@pytest.mark.gpu
def test_a_cuda_checkpoint_brings_back_the_gpu_generators(tmp_path: Path) -> None:
    use_device("cuda")
    _, whole = trained(tmp_path / "whole", 3)
    trained(tmp_path / "killed", 1)
    saved = torch.load(next((tmp_path / "killed").glob("epoch_*.pt")), weights_only=True)
    assert len(saved["cuda_rng"]) == torch.cuda.device_count()
    _, resumed = trained(tmp_path / "killed", 3, resume=True)
    assert torch.equal(whole.weight, resumed.weight) and torch.equal(whole.bias, resumed.bias)
