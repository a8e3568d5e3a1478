"""The student variants of method A (docs/methods.md §A.4–§A.7): the full method, its baselines and ablations.

A variant says which RGB tiles it trains on, where their MS partners come from and which loss
terms are on, so that every comparison shares data, optimiser steps and seeds. "Labelled" means
the `student.rgb_labels_per_class` (or, in the compare stage, K) tiles per class whose label the
student may see; the other rgb_train tiles are unlabelled for training.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    """One row of the comparison."""

    name: str
    every_label: bool = False  # train with every rgb_train label whatever K is (the oracle)
    unlabelled: bool = False  # the unlabelled rgb_train tiles join the training set
    partners: str = "none"  # matched (pairs table) | random (pool tile of the matched class) | true | none
    feature_loss: bool = False  # cross-modal attention + domain-shift term
    kd: bool = False  # KL to the partner's teacher distribution
    rematch: bool = False  # balanced re-matching on the student's smoothed prediction (A.6)
    self_training: bool = False  # FixMatch term on the unlabelled tiles
    label_smoothing: float = 0.0  # of the cross-entropy on labelled tiles


FULL_METHOD = "full_method"
BASELINE = "rgb_only"
_ALL: tuple[Variant, ...] = (
    Variant(BASELINE),
    Variant("label_smoothing", label_smoothing=0.1),
    Variant("self_training", unlabelled=True, self_training=True),
    Variant("paired_kd", partners="true", feature_loss=True, kd=True),  # + pair_train tiles, true partners
    Variant(FULL_METHOD, unlabelled=True, partners="matched", feature_loss=True, kd=True, rematch=True),
    Variant(
        "full_method_self_training",
        unlabelled=True,
        partners="matched",
        feature_loss=True,
        kd=True,
        rematch=True,
        self_training=True,
    ),
    Variant("oracle", every_label=True),  # the upper bound: every rgb_train tile with its label
    Variant("no_feature_loss", unlabelled=True, partners="matched", kd=True, rematch=True),
    Variant("no_rematch", unlabelled=True, partners="matched", feature_loss=True, kd=True),
    Variant("kd_random_pairs", unlabelled=True, partners="random", kd=True),
)
VARIANTS: dict[str, Variant] = {v.name: v for v in _ALL}
