"""Shared training plumbing: batch bounds, augmentation, the Trainer and its checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ms2rgb.tasks.training.augment import apply_dihedral, dihedral, random_dihedral
from ms2rgb.tasks.training.loop import EpochStats, FitConfig, Trainer, batch_bounds
from ms2rgb.tasks.training.metrics import accuracy_report, confusion_matrix, iou_report
from ms2rgb.tasks.training.progress import epoch_printer


def test_batch_bounds_cover_every_item_once_and_merge_runts() -> None:
    assert batch_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert batch_bounds(9, 4, min_batch=2) == [(0, 4), (4, 9)]  # a 1-tile tail joins its neighbour
    assert batch_bounds(3, 4, min_batch=2) == [(0, 3)]  # a single batch is never merged away
    for n, size, low in ((81, 32, 16), (80, 64, 32), (7, 7, 3)):
        bounds = batch_bounds(n, size, low)
        covered = np.concatenate([np.arange(b, e) for b, e in bounds])
        assert np.array_equal(covered, np.arange(n)) and min(e - b for b, e in bounds) >= min(low, n)


def test_random_dihedral_applies_one_symmetry_per_sample_to_all_tensors() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.arange(64 * 2 * 4 * 4, dtype=torch.float32).view(64, 2, 4, 4)
    b = a * 10 + 1  # a partner tile that must move exactly like `a`
    out_a, out_b = random_dihedral((a, b), gen)
    torch.testing.assert_close(out_b, out_a * 10 + 1)
    symmetries = [torch.rot90(a, k, dims=(-2, -1)) for k in range(4)]
    symmetries += [s.flip(-1) for s in symmetries]
    used = set()
    for i in range(64):
        matches = [k for k, s in enumerate(symmetries) if torch.equal(out_a[i], s[i])]
        assert len(matches) == 1  # each output is exactly one of the 8 symmetries of its input
        used.add(matches[0])
    assert len(used) == 8 and torch.equal(a, torch.arange(a.numel(), dtype=torch.float32).view(a.shape))


def _toy_trainer(tmp_path: Path, seed: int) -> tuple[Trainer, nn.Module]:
    torch.manual_seed(seed)
    model = nn.Linear(4, 3)
    x, y = torch.randn(20, 4, generator=torch.Generator().manual_seed(1)), torch.arange(20) % 3
    trainer = Trainer(
        model, 20, FitConfig(epochs=3, batch_size=8, lr=0.05, weight_decay=1e-4), seed, checkpoint_dir=tmp_path
    )

    def step(idx: np.ndarray) -> tuple[torch.Tensor, int, int]:
        logits = model(x[idx])
        return nn.functional.cross_entropy(logits, y[idx]), int((logits.argmax(1) == y[idx]).sum()), len(idx)

    for _ in range(3):
        trainer.run_epoch(step)
        trainer.save_checkpoint({"note": "caller state"})
    return trainer, model


def test_trainer_is_seeded_and_checkpoints_are_complete(tmp_path: Path) -> None:
    first, model = _toy_trainer(tmp_path / "a", seed=3)
    again, _ = _toy_trainer(tmp_path / "b", seed=3)
    assert [h.loss for h in first.history] == [h.loss for h in again.history]
    assert first.history[-1].loss < first.history[0].loss
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["epoch_002.pt"]  # only the newest is kept
    state = torch.load(tmp_path / "a" / "epoch_002.pt", weights_only=False)
    keys = {"fingerprint", "epoch", "epochs", "module", "optimizer", "scheduler", "generator", "torch_rng", "history"}
    assert keys | {"extra"} <= set(state)
    assert state["epoch"] == 2 and state["extra"] == {"note": "caller state"} and len(state["history"]) == 3
    torch.testing.assert_close(state["module"]["weight"], model.weight.detach())
    assert state["optimizer"]["state"]  # AdamW moments are there, so a resume continues the same run


def test_epoch_printer_prints_first_last_and_about_twenty_lines_of_a_long_run(capsys) -> None:
    trainer = Trainer(nn.Linear(2, 2), 4, FitConfig(900, 4, 0.01, 0.0), seed=0)
    report = epoch_printer("run")
    for epoch in range(900):
        report(trainer, EpochStats(epoch, 1.0, 0.5, 0.01))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("run: epoch 1/900") and lines[-1].startswith("run: epoch 900/900")
    assert len(lines) == 21  # epoch 1, then every 45th
    short = Trainer(nn.Linear(2, 2), 4, FitConfig(15, 4, 0.01, 0.0), seed=0)
    for epoch in range(15):
        epoch_printer("short")(short, EpochStats(epoch, 1.0, 0.5, 0.01))
    assert len(capsys.readouterr().out.splitlines()) == 15  # a short run shows every epoch


def test_accuracy_report_confusion_rows_are_true_classes() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    report = accuracy_report(logits, np.array([0, 1, 1]), ["a", "b"])
    assert report["confusion"] == [[1, 0], [1, 1]]
    assert report["per_class"] == {"a": 1.0, "b": 0.5} and abs(report["accuracy"] - 2 / 3) < 1e-9


def test_confusion_matrix_counts_rows_true_columns_predicted() -> None:
    conf = confusion_matrix(np.array([0, 1, 1, 2]), np.array([0, 0, 1, 2]), 3)
    assert conf.dtype == np.int64 and conf.tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    truth = np.array([[0, 0, 1], [255, 2, 255]])  # maps: any shape, ignored truths count nowhere
    pred = np.array([[0, 1, 1], [0, 2, 2]])
    assert confusion_matrix(truth, pred, 3, ignore_index=255).tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]
    assert confusion_matrix(np.array([], dtype=np.int64), np.array([], dtype=np.int64), 2).tolist() == [[0, 0], [0, 0]]


def test_accuracy_and_iou_reports_read_the_same_confusion_matrix() -> None:
    labels = np.array([0, 1, 1, 2, 2, 2])
    logits = torch.nn.functional.one_hot(torch.tensor([0, 1, 0, 2, 2, 1]), 3).float()
    report = accuracy_report(logits, labels, ["a", "b", "c"])
    conf = np.array(report["confusion"])
    assert conf.tolist() == confusion_matrix(labels, logits.argmax(1).numpy(), 3).tolist()
    assert iou_report(conf, ["a", "b", "c"])["pixel_accuracy"] == pytest.approx(report["accuracy"])


@pytest.mark.parametrize(
    "make, draw",
    [
        (lambda: torch.Generator().manual_seed(4), lambda g, n: torch.randint(0, 8, (n,), generator=g)),  # the loop's
        (
            lambda: np.random.default_rng(4),
            lambda g, n: g.integers(0, 8, n),
        ),  # the detector's (checkpointed numpy state)
    ],
)
def test_random_dihedral_draws_one_code_per_sample_from_the_callers_generator(make, draw) -> None:
    images = torch.arange(10 * 3 * 4 * 4, dtype=torch.int64).view(10, 3, 4, 4).to(torch.uint8)
    masks = images[:, 0] // 2
    gen, twin = make(), make()
    out_images, out_masks = random_dihedral((images, masks), gen)
    codes = draw(twin, 10)
    expected_images, expected_masks = apply_dihedral((images, masks), codes)
    assert torch.equal(out_images, expected_images) and torch.equal(out_masks, expected_masks)
    for i, k in enumerate(codes.tolist()):
        assert torch.equal(out_images[i], dihedral(images[i], k)) and torch.equal(out_masks[i], dihedral(masks[i], k))
    assert np.array_equal(np.asarray(draw(gen, 5)), np.asarray(draw(twin, 5)))  # generators left in step
