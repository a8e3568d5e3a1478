"""What a valid data set looks like, as Great Expectations suites over six small frames.

GX column expectations look at one column (or a pair) of one frame, so the dataset-level rules are
turned into frames first: per-tile facts with the expected bands/dtype beside them, class shares
per split, row counts of required splits, and one row per location. Each frame names its rows in
an `id` column because a checkpoint applies one result_format (and so one
`unexpected_index_column_names`) to every batch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

os.environ["GX_ANALYTICS_ENABLED"] = "false"  # before the import: the pipeline never reaches the network
import great_expectations.expectations as gxe
from great_expectations.expectations.metadata_types import FailureSeverity

from ms2rgb.tasks.data.classes import MASK_NODATA, SCENE_NAMES, SURFACE_NAMES
from ms2rgb.tasks.data.geotiff import TILE_SIZE
from ms2rgb.tasks.data.manifest import (
    FOLDER_SOURCE_PREFIX,
    MODALITIES,
    MODALITY_FORMATS,
    SEGMENTATION_SPLITS,
    SPLITS,
)
from ms2rgb.tasks.errors import ParamsError

if TYPE_CHECKING:
    from ms2rgb.tasks.config import ValidateConfig

ID_COLUMN = "id"  # every frame's row name; the failure report lists these
# "EPSG:<code>" or a WKT1/WKT2 definition: what rasterio's CRS.to_string() gives back.
# LOCAL_CS: the pixel grid of a user image that had no CRS (tasks/data/sources/mask_folder.py).
CRS_PATTERN = r"^(?:EPSG:\d+$|(?:PROJCS|GEOGCS|COMPD_CS|PROJCRS|GEOGCRS|COMPOUNDCRS|BOUNDCRS|LOCAL_CS)\[)"
UINT8_MAX = 255


@dataclass(frozen=True)
class Check:
    """One GX batch: a named frame and the expectations its rows must meet."""

    name: str  # data asset and suite name, e.g. "tiles"
    frame: pd.DataFrame  # has an ID_COLUMN
    expectations: list[gxe.Expectation]
    tile_rows: bool = False  # rows are manifest tiles, so failures can name their files
    file_column: str = "path"  # the manifest column of the file a failure names (masks: mask_path)


def _in_set(column: str, values: list, why: str) -> gxe.Expectation:
    """Values of `column` lie in `values`; nulls are allowed (GX skips them)."""
    return gxe.ExpectColumnValuesToBeInSet(column=column, value_set=values, notes=why)


def _at_most(limit: str, column: str, notes: str) -> gxe.Expectation:
    """`column` <= `limit`, row by row; a row where either is missing is not checked (no limit there)."""
    return gxe.ExpectColumnPairValuesAToBeGreaterThanB(
        column_A=limit, column_B=column, or_equal=True, ignore_row_if="either_value_is_missing", notes=notes
    )


def _all_true(column: str, why: str) -> gxe.Expectation:
    return _in_set(column, [True], why)


def _pair_equal(column: str, expected: str, why: str) -> gxe.Expectation:
    # Rows with a missing side are unreadable or have an unknown modality; other expectations
    # report those, so this one stays about the value itself.
    return gxe.ExpectColumnPairValuesToBeEqual(
        column_A=column, column_B=expected, ignore_row_if="either_value_is_missing", notes=why
    )


def manifest_check(manifest: pd.DataFrame, cfg: ValidateConfig) -> Check:
    """Schema-level rules on the manifest rows themselves."""
    expectations = [
        gxe.ExpectTableRowCountToBeBetween(min_value=1, notes="an empty manifest trains nothing"),
        gxe.ExpectColumnValuesToBeUnique(column="id", notes="ids key every cache and report"),
        gxe.ExpectColumnValuesToBeUnique(
            column="sha256", notes="the same tile twice (e.g. one scene ingested under two ids) would weigh double"
        ),
        *[
            gxe.ExpectColumnValuesToNotBeNull(column=c, notes="every tile needs it")
            for c in ("id", "modality", "path", "split", "location_id", "crs")
        ],
        _in_set("modality", list(MODALITIES), "tasks.manifest.MODALITIES"),
        _in_set("split", list(SPLITS), "tasks.manifest.SPLITS"),
        _in_set("class", list(SCENE_NAMES), "tasks.classes.SCENE_NAMES; <NA> marks an unlabelled tile"),
        gxe.ExpectColumnValuesToMatchRegex(column="crs", regex=CRS_PATTERN, notes="EPSG:<code> or WKT"),
        gxe.ExpectColumnValuesToBeBetween(
            column="cloud_share",
            min_value=0.0,
            max_value=cfg.max_cloud_share,
            notes="scene tiles: cloud share at ingestion (s2cloudless); NaN (labelled sources) is not checked",
        ),
    ]
    return Check("manifest", manifest.reset_index(drop=True), expectations, tile_rows=True)


def tiles_frame(manifest: pd.DataFrame, stats: pd.DataFrame, cfg: ValidateConfig) -> pd.DataFrame:
    """Tile stats with the per-modality expectations beside them, so GX can compare pairs of columns."""
    frame = stats.reset_index(drop=True).copy()
    modality = manifest["modality"].reset_index(drop=True)  # stats rows follow manifest rows
    frame["modality"] = modality
    frame["expected_bands"] = modality.map({m: len(f.bands) for m, f in MODALITY_FORMATS.items()}).astype("Int64")
    frame["expected_dtype"] = modality.map({m: f.dtype for m, f in MODALITY_FORMATS.items()}).astype("string")
    frame["value_limit"] = modality.map({"ms": cfg.ms_value_max, "rgb": UINT8_MAX}).astype("float64")
    return frame


def tiles_check(frame: pd.DataFrame, cfg: ValidateConfig) -> Check:
    """Each file exists, decodes, matches its checksum and holds sane pixels."""
    expectations = [
        _all_true("file_exists", "the manifest points at a missing file"),
        _all_true("readable", "the file is corrupt or truncated"),
        _all_true("sha_matches", "the file changed since the manifest was written"),
        _pair_equal("band_count", "expected_bands", "MS: 13 Sentinel-2 bands; RGB: B04/B03/B02"),
        _pair_equal("dtype", "expected_dtype", "MS: uint16 reflectance x10000; RGB: uint8"),
        _in_set("height", [TILE_SIZE], "tiles are TILE_SIZE pixels square"),
        _in_set("width", [TILE_SIZE], "tiles are TILE_SIZE pixels square"),
        gxe.ExpectColumnValuesToBeBetween(
            column="nan_share", min_value=0.0, max_value=0.0, notes="NaN pixels poison normalisation statistics"
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="nodata_share", min_value=0.0, max_value=cfg.max_nodata_share, notes="tile mostly outside a scene"
        ),
        _at_most("value_limit", "max_value", "MS values above validate.ms_value_max, RGB above 255"),
        gxe.ExpectColumnValuesToBeBetween(
            column="saturated_share",
            min_value=0.0,
            max_value=cfg.max_saturated_share,
            notes="MS pixels at 65535 (L1C saturation) in any band; NaN (RGB) is not checked",
        ),
        gxe.ExpectColumnValuesToBeBetween(column="max_value", min_value=1, notes="an all-zero tile is empty"),
        _all_true("has_crs", "tiles must be georeferenced"),
        _all_true("mask_ok", "masks: one uint8 band with the tile's height and width"),
    ]
    return Check("tiles", frame, expectations, tile_rows=True)


def masks_frame(manifest: pd.DataFrame, stats: pd.DataFrame, n_classes: int, cfg: ValidateConfig) -> pd.DataFrame:
    """The rows with a mask: its largest class value and ignored share beside the limits they must keep.
    Only the folder source's masks have an ignore limit: weak labels ignore uncertain pixels by design."""
    has_mask = manifest["mask_path"].notna().to_numpy()
    rows = manifest[has_mask].reset_index(drop=True)
    frame = stats[has_mask].reset_index(drop=True)[["id", "mask_max", "ignore_share"]].copy()
    # The legend is the detector's (its splits); other masks are the synthetic source's surfaces.
    detector = rows["split"].isin(list(SEGMENTATION_SPLITS)).to_numpy(bool)
    frame["class_limit"] = pd.array(np.where(detector, n_classes, len(SURFACE_NAMES)) - 1, dtype="Int64")
    folder = rows["source"].astype("string").str.startswith(FOLDER_SOURCE_PREFIX).fillna(False).to_numpy(bool)
    frame["ignore_limit"] = np.where(folder, cfg.max_ignore_share, np.nan)
    return frame


def masks_check(frame: pd.DataFrame, n_classes: int) -> Check:
    """Mask values are classes of the legend; folder masks are mostly labelled."""
    expectations: list[gxe.Expectation] = [
        _at_most(
            "class_limit",
            "mask_max",
            f"detector masks index the legend (0..{n_classes - 1}), others the surfaces; {MASK_NODATA}: no label",
        ),
        _at_most(
            "ignore_limit",
            "ignore_share",
            "folder masks: share of pixels without label above validate.max_ignore_share "
            "(`ms2rgb data masks` leaves such tiles out: re-run it after lowering the limit)",
        ),
    ]
    return Check("masks", frame, expectations, tile_rows=True, file_column="mask_path")


def class_balance_frame(manifest: pd.DataFrame, cfg: ValidateConfig) -> pd.DataFrame:
    """Share of each class among the labelled rows of each split (0 where a known class is absent)."""
    labelled = manifest[manifest["class"].notna() & manifest["split"].isin(list(cfg.balance_splits))]
    counts = pd.crosstab(labelled["split"].astype(str), labelled["class"].astype(str))  # (splits, classes)
    shares = counts.div(counts.sum(axis=1), axis=0)
    long = shares.stack().rename("share").reset_index()
    long.columns = ["split", "class", "share"]
    long["n"] = counts.stack().to_numpy()
    long.insert(0, ID_COLUMN, long["split"] + "/" + long["class"])
    return long.astype({ID_COLUMN: "string", "split": "string", "class": "string"})


def splits_frame(manifest: pd.DataFrame, cfg: ValidateConfig) -> pd.DataFrame:
    """Row count of each required split."""
    counts = manifest["split"].value_counts()
    return pd.DataFrame(
        {
            ID_COLUMN: pd.array(cfg.required_splits, dtype="string"),
            "n_rows": [int(counts.get(s, 0)) for s in cfg.required_splits],
        }
    )


def locations_frame(manifest: pd.DataFrame, cfg: ValidateConfig) -> pd.DataFrame:
    """One row per location: how many splits it is in, and whether a paired split has both modalities."""
    rows = manifest[manifest["location_id"].notna()]
    flags = pd.DataFrame(
        {
            ID_COLUMN: rows["location_id"].astype(str),
            "split": rows["split"].astype(str),
            "is_ms": (rows["modality"] == "ms").fillna(False).astype(bool),
            "is_rgb": (rows["modality"] == "rgb").fillna(False).astype(bool),
            "paired": rows["split"].isin(list(cfg.paired_splits)).astype(bool),
        }
    )
    per = (
        flags.groupby(ID_COLUMN, sort=True)
        .agg(
            n_splits=("split", "nunique"), has_ms=("is_ms", "any"), has_rgb=("is_rgb", "any"), paired=("paired", "any")
        )
        .reset_index()
    )
    per["pair_ok"] = ~per["paired"] | (per["has_ms"] & per["has_rgb"])
    return per.astype({ID_COLUMN: "string"})


def expectation_key(batch: str, expectation: gxe.Expectation) -> str:
    """ "<batch>.<column>" (columns of a pair joined by "/", table-level: the batch alone): how
    validate.severity names an expectation."""
    kwargs = expectation.configuration.kwargs
    column = kwargs.get("column") or "/".join(kwargs[k] for k in ("column_A", "column_B") if k in kwargs)
    return f"{batch}.{column}" if column else batch


def apply_severity(checks: list[Check], severity: Mapping[str, str]) -> list[Check]:
    """Mark the expectations validate.severity names as warnings (GX WARNING); the rest stay critical.
    A key that names no expectation is a params error, listing the keys there are."""
    keys = {expectation_key(c.name, e) for c in checks for e in c.expectations}
    unknown = sorted(set(severity) - keys)
    if unknown:
        raise ParamsError(
            f"validate.severity.{unknown[0]}", severity[unknown[0]], f"names no expectation; known keys: {sorted(keys)}"
        )
    for check in checks:
        for expectation in check.expectations:
            if severity.get(expectation_key(check.name, expectation)) == "warn":
                expectation.severity = FailureSeverity.WARNING
    return checks


def dataset_checks(
    manifest: pd.DataFrame, stats: pd.DataFrame, cfg: ValidateConfig, n_classes: int = len(SURFACE_NAMES)
) -> list[Check]:
    """All batches and their expectations, in report order, with the severities of params.
    `n_classes`: the classes of the segmentation legend, which mask values index."""
    return apply_severity(_checks(manifest, stats, cfg, n_classes), cfg.severity)


def _checks(manifest: pd.DataFrame, stats: pd.DataFrame, cfg: ValidateConfig, n_classes: int) -> list[Check]:
    balance = class_balance_frame(manifest, cfg)
    return [
        manifest_check(manifest, cfg),
        tiles_check(tiles_frame(manifest, stats, cfg), cfg),
        masks_check(masks_frame(manifest, stats, n_classes, cfg), n_classes),
        Check(
            "class_balance",
            balance,
            [
                gxe.ExpectColumnValuesToBeBetween(
                    column="share",
                    min_value=cfg.min_class_share,
                    max_value=cfg.max_class_share,
                    notes="share of each class among a split's labelled rows",
                )
            ],
        ),
        Check(
            "splits",
            splits_frame(manifest, cfg),
            [
                gxe.ExpectColumnValuesToBeBetween(
                    column="n_rows", min_value=1, notes="the stages need every required split"
                )
            ],
        ),
        Check(
            "locations",
            locations_frame(manifest, cfg),
            [
                gxe.ExpectColumnValuesToBeBetween(
                    column="n_splits",
                    min_value=1,
                    max_value=1,
                    notes="a location in two splits leaks test data into training",
                ),
                _all_true("pair_ok", "pair_train/pair_test/test locations need an ms and an rgb tile"),
            ],
        ),
    ]
