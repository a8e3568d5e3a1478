"""matcher stage: smoke run, retrieval metrics, pair alignment, MLflow round trip of the scorer."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import mlflow.pytorch
import numpy as np
import pandas as pd
import pytest
import torch
from helpers_method_a import staged_project

from ms2rgb.flows.stages import run_stage
from ms2rgb.models.matcher import CrossModalMatcher, MatcherConfig
from ms2rgb.tasks.data.pairing import PairSet, load_true_pairs
from ms2rgb.tasks.errors import DataError
from ms2rgb.tasks.training.inference import retrieval
from ms2rgb.tasks.training.store import load_model


@pytest.fixture
def matched(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> Path:
    return staged_project(tmp_path_factory, "matcher", tmp_path / "project")


def test_matcher_stage_report_and_registered_scorer(matched: Path) -> None:
    report = json.loads((matched / "reports" / "matcher.json").read_text())
    assert 0.0 <= report["pair_top1"] <= report["pair_top5"] <= 1.0
    assert 0.0 <= report["pair_same_class_rate"] <= 1.0
    assert "same_class_rate" not in report  # the matcher reads no pool: a new scene leaves it fresh
    assert report["pair_chance_top1"] == pytest.approx(1 / report["test_pairs"])
    assert len(list((matched / "artifacts" / "matcher" / "checkpoints").glob("epoch_*.pt"))) == report["epochs"]
    # The registry copy scores pairs exactly like the model the stage wrote to disk.
    report = run_stage("matcher", matched)  # the copy has no MLflow store; this run registers version 1
    matcher = load_model(matched / "artifacts" / "matcher" / "model.pt", "matcher", "matcher")
    pairs = load_true_pairs(matched / "data" / "prepared", "pair_test")
    stacked = torch.cat(
        [torch.from_numpy(pairs.rgb[:4]).float(), torch.from_numpy(pairs.ms[:4].astype(np.float32))], 1
    )  # (4, 3 + 13, H, W)
    mlflow.set_tracking_uri(f"sqlite:///{matched / 'mlflow.db'}")
    served = mlflow.pytorch.load_model(f"models:/ms2rgb-matcher/{report['model_version']}")
    with torch.no_grad():
        expected = (matcher.embed_rgb(stacked[:, :3]) * matcher.embed_ms(stacked[:, 3:])).sum(-1)
        torch.testing.assert_close(served(stacked), expected)


def test_load_pairs_aligns_by_location(matched: Path) -> None:
    prepared = matched / "data" / "prepared"
    pairs = load_true_pairs(prepared, "pair_train")
    manifest = pd.read_parquet(prepared / "manifest.parquet")
    rows = manifest[manifest["split"] == "pair_train"]
    assert len(pairs.labels) == len(rows) // 2 and pairs.rgb.shape[1] == 3 and pairs.ms.shape[1] == 13
    # Drop one MS tile's location (in the split's index, which open_split reads): its RGB partner
    # is left without a pair.
    index = pd.read_parquet(prepared / "pair_train-ms-index.parquet")
    index.loc[0, "location_id"] = "nowhere"
    index.to_parquet(prepared / "pair_train-ms-index.parquet", index=False)
    with pytest.raises(DataError, match="locations without both"):
        load_true_pairs(prepared, "pair_train")


def test_retrieval_ranks_the_true_partner() -> None:
    """A matcher whose towers agree on every location retrieves each partner at rank 1."""

    class Agreeing(CrossModalMatcher):
        def embed_rgb(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.normalize(x.flatten(1)[:, :8], dim=1)

        def embed_ms(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.normalize(x.flatten(1)[:, :8], dim=1)

    gen = np.random.default_rng(0)
    base = gen.uniform(0, 255, (6, 3, 8, 8)).astype(np.float32)
    pairs = PairSet(rgb=base, ms=base.copy(), labels=np.arange(6))
    metrics = retrieval(Agreeing(MatcherConfig(width=4, embed_dim=8)), pairs)
    assert metrics["pair_top1"] == 1.0 and metrics["pair_same_class_rate"] == 1.0
    shuffled = PairSet(rgb=base, ms=base[::-1].copy(), labels=np.arange(6))
    assert retrieval(Agreeing(MatcherConfig(width=4, embed_dim=8)), shuffled)["pair_top1"] == 0.0
