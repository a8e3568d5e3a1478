"""The validate stage: check a manifest and its tiles with Great Expectations before any training.

`validate_dataset` never raises for bad data: it writes the GX result, Data Docs and a short
summary under `out_dir` and returns a ValidationOutcome; `raise_if_failed` turns a failed
outcome into ValidationFailed. Everything it writes stays under `out_dir`:

    out_dir/validate.json          summary: passed, expectations, failed (ids, files, count)
    out_dir/validate_result.json   the GX checkpoint result (CheckpointResult.describe_dict())
    out_dir/data_docs/index.html   GX Data Docs site (one page per batch and run)
    out_dir/gx_frames/*.parquet    the frames GX validated (tile stats, class shares, ...)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

import numpy as np
import pandas as pd

os.environ["GX_ANALYTICS_ENABLED"] = "false"  # before the import: the pipeline never reaches the network
import great_expectations as gx
from great_expectations.checkpoint import CheckpointResult, UpdateDataDocsAction
from great_expectations.data_context.types.base import (
    DataContextConfig,
    InMemoryStoreBackendDefaults,
    ProgressBarsConfig,
)
from great_expectations.expectations.metadata_types import FailureSeverity

from ms2rgb.tasks.config import Params, ValidateConfig
from ms2rgb.tasks.data.atomic import write_json_atomic
from ms2rgb.tasks.data.expectations import ID_COLUMN, Check, dataset_checks
from ms2rgb.tasks.data.legend import SYNTH_LEGEND, read_legend
from ms2rgb.tasks.data.manifest import read_manifest
from ms2rgb.tasks.data.tile_stats import MEMO, compute_tile_stats
from ms2rgb.tasks.data.validated import clear_stamps, write_stamps
from ms2rgb.tasks.errors import Ms2rgbError, ValidationFailed

if TYPE_CHECKING:
    from ms2rgb.tasks.tracking import StageTracker  # imported for annotations only: it loads mlflow

DOCS_SITE = "ms2rgb_site"


@dataclass(frozen=True)
class ValidationOutcome:
    """What validate_dataset found and where it wrote it; raise_if_failed turns it into an error."""

    passed: bool  # every expectation of severity `fail` met (warnings do not stop the pipeline)
    expectations: int  # how many were evaluated
    failed: list[dict[str, Any]]  # {batch, expectation, column, severity, offending, count[, files, observed, error]}
    result_json: Path  # GX checkpoint result
    docs_index: Path  # Data Docs index.html
    summary_json: Path  # out_dir/validate.json, the summary above as a file


@dataclass(frozen=True)
class _Outputs:
    """Every path validate_dataset writes, all checked to lie under out_dir."""

    out_dir: Path

    @property
    def frames(self) -> Path:
        return self.out_dir / "gx_frames"

    @property
    def docs(self) -> Path:
        return self.out_dir / "data_docs"

    @property
    def result_json(self) -> Path:
        return self.out_dir / "validate_result.json"

    @property
    def summary_json(self) -> Path:
        return self.out_dir / "validate.json"

    def prepare(self, manifest_path: Path) -> None:
        """Create the folders; refuse symlinks that would send writes elsewhere or over the manifest."""
        root = self.out_dir.resolve()
        for path in (self.frames, self.docs, self.result_json, self.summary_json):
            if not path.resolve().is_relative_to(root):  # checked before mkdir follows any link
                raise Ms2rgbError(
                    f"{path} resolves to {path.resolve()}, outside {root}; "
                    "remove that link or pick another validate output folder"
                )
        manifest = manifest_path.resolve()
        if manifest in (self.result_json.resolve(), self.summary_json.resolve()) or any(
            manifest.is_relative_to(folder.resolve()) for folder in (self.frames, self.docs)
        ):
            raise Ms2rgbError(
                f"{manifest_path}: the manifest lies where validation writes its reports; "
                "pick a validate output folder apart from the data"
            )
        self.frames.mkdir(parents=True, exist_ok=True)
        self.docs.mkdir(parents=True, exist_ok=True)


def _json_default(value: Any) -> Any:
    """Make numpy/pandas scalars and paths JSON-able; anything else becomes its text."""
    if isinstance(value, np.generic):
        return value.item()
    if value is pd.NA:
        return None
    return str(value)


def _context(docs_dir: Path) -> Any:
    """An in-memory GX context whose only Data Docs site is docs_dir (no temp site, no progress bars)."""
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        progress_bars=ProgressBarsConfig(globally=False),
        analytics_enabled=False,
        data_docs_sites={
            DOCS_SITE: {
                "class_name": "SiteBuilder",
                "show_how_to_buttons": False,
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            }
        },
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def run_checkpoint(context: Any, checks: list[Check], frames_dir: Path, max_listed: int) -> CheckpointResult:
    """One validation definition per check, all run by one checkpoint that updates the Data Docs.

    Frames go through parquet files rather than runtime dataframes because a checkpoint passes
    the same batch_parameters (and so the same dataframe) to every validation definition.
    """
    source = context.data_sources.add_pandas("ms2rgb")
    definitions = []
    for check in checks:
        path = frames_dir / f"{check.name}.parquet"
        check.frame.to_parquet(path, index=False)
        batch = source.add_parquet_asset(check.name, path=path).add_batch_definition_whole_dataframe("all")
        suite = context.suites.add(gx.ExpectationSuite(name=check.name, expectations=check.expectations))
        definitions.append(
            context.validation_definitions.add(gx.ValidationDefinition(name=check.name, data=batch, suite=suite))
        )
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name="validate",
            validation_definitions=definitions,
            actions=[UpdateDataDocsAction(name="data_docs", site_names=[DOCS_SITE])],
            result_format={
                "result_format": "SUMMARY",
                "unexpected_index_column_names": [ID_COLUMN],
                "partial_unexpected_count": max_listed,
            },
        )
    )
    return checkpoint.run()


def _docs_index(context: Any, outputs: _Outputs) -> Path:
    """Where GX put the site's index.html (asked of GX, then checked to be ours)."""
    urls = context.get_docs_sites_urls(site_name=DOCS_SITE, only_if_exists=False)
    index = Path(unquote(urlparse(urls[0]["site_url"]).path)) if urls else outputs.docs / "index.html"
    return index if index.resolve().is_relative_to(outputs.docs.resolve()) else outputs.docs / "index.html"


def _failure(batch: str, result: Any, files: dict[str, str] | None, max_listed: int) -> dict[str, Any]:
    """One failed expectation as {batch, expectation, column, offending, count, ...}."""
    kwargs = result.expectation_config.kwargs
    column = kwargs.get("column") or "/".join(kwargs[k] for k in ("column_A", "column_B") if k in kwargs)
    details = result.result or {}
    ids = [str(item.get(ID_COLUMN)) for item in details.get("partial_unexpected_index_list") or []]
    ids = list(dict.fromkeys(ids))[:max_listed]  # a duplicate id is listed once per row
    entry: dict[str, Any] = {
        "batch": batch,
        "expectation": result.expectation_config.type,
        "column": column or None,
        "severity": "warn" if result.expectation_config.severity == FailureSeverity.WARNING else "fail",
        "offending": ids,
        "count": int(details.get("unexpected_count") or len(ids)),
    }
    if files is not None:
        entry["files"] = [files[i] for i in ids if i in files]
    if "observed_value" in details:  # table-level expectations have no rows to name
        entry["observed"] = details["observed_value"]
    if (result.exception_info or {}).get("raised_exception"):
        entry["error"] = result.exception_info.get("exception_message")
    return entry


def summarise_failures(
    result: CheckpointResult, checks: list[Check], manifest: pd.DataFrame, max_listed: int
) -> list[dict[str, Any]]:
    """Failed expectations of every batch, naming offending ids and (for tile rows) their files."""
    ids = manifest["id"].astype(str)
    files = {  # per tile batch: id -> the file it judges (the tile, or its mask)
        c.name: dict(zip(ids, manifest[c.file_column].astype(str))) for c in checks if c.tile_rows
    }
    failed = []
    for suite_result in result.run_results.values():
        name = suite_result.suite_name
        for expectation_result in suite_result.results:
            if not expectation_result.success:
                failed.append(_failure(name, expectation_result, files.get(name), max_listed))
    return failed


def validate_dataset(
    manifest_path: Path,
    data_root: Path,
    out_dir: Path,
    cfg: ValidateConfig,
    progress: Callable[[str], None] = print,
    memo: Path | None = None,
) -> ValidationOutcome:
    """Validate the manifest and every tile; write the GX result, Data Docs and validate.json.
    `memo`: where tile facts are kept by content between runs (tasks/data/tile_stats.py).

    Raises only when validation cannot run (no manifest, unsafe out_dir), never for failed checks.
    """
    outputs = _Outputs(Path(out_dir))
    outputs.prepare(Path(manifest_path))
    manifest = read_manifest(Path(manifest_path))
    stats = compute_tile_stats(manifest, Path(data_root), progress, memo)
    # A prepared folder holds the legend of its masks; a source's own manifest (synth, EuroSAT) has
    # none, and its masks, where it has any, are the generator's surfaces.
    classes = read_legend(Path(manifest_path).parent, missing=SYNTH_LEGEND)
    checks = dataset_checks(manifest, stats, cfg, len(classes))
    progress(f"validate: {sum(len(c.expectations) for c in checks)} expectations over {len(checks)} batches")
    context = _context(outputs.docs.resolve())
    result = run_checkpoint(context, checks, outputs.frames, cfg.max_listed)
    failed = summarise_failures(result, checks, manifest, cfg.max_listed)
    evaluated = sum(r.statistics["evaluated_expectations"] for r in result.run_results.values())
    outcome = ValidationOutcome(
        passed=not any(f["severity"] == "fail" for f in failed),
        expectations=int(evaluated),
        failed=failed,
        result_json=outputs.result_json,
        docs_index=_docs_index(context, outputs),
        summary_json=outputs.summary_json,
    )
    write_json_atomic(outputs.result_json, result.describe_dict(), default=_json_default)
    write_json_atomic(
        outputs.summary_json,
        {
            "passed": outcome.passed,
            "expectations": outcome.expectations,
            "failed": failed,
            "warnings": sum(f["severity"] == "warn" for f in failed),
            "tiles": len(manifest),
            "manifest": str(manifest_path),
            "result_json": str(outcome.result_json),
            "docs_index": str(outcome.docs_index),
        },
        default=_json_default,
    )
    warned = [describe_failure(f) for f in failed if f["severity"] == "warn"]
    for line in warned:
        progress(f"validate: warning: {line}")
    verdict = f"passed with {len(warned)} warning(s)" if outcome.passed else f"{len(failed) - len(warned)} failed"
    progress(f"validate: {verdict}; Data Docs at {outcome.docs_index}")
    return outcome


def describe_failure(failure: dict[str, Any]) -> str:
    """One line: which expectation failed on which column, and the offending ids with their files."""
    files = failure.get("files") or []
    named = [f"{i} ({f})" for i, f in zip(failure["offending"], files)] + failure["offending"][len(files) :]
    more = failure["count"] - len(named)
    tail = f" (+{more} more)" if more > 0 else ""
    subject = f"{failure['batch']}.{failure['column']}" if failure["column"] else failure["batch"]
    extra = f" [{failure['error']}]" if failure.get("error") else ""
    body = (
        f"{failure['count']} offending: {', '.join(named)}{tail}" if named else f"observed {failure.get('observed')!r}"
    )  # table-level: no rows to name
    return f"{failure['expectation']} on {subject}: {body}{extra}"


def raise_if_failed(outcome: ValidationOutcome) -> None:
    """Raise ValidationFailed listing each failed expectation with its offending ids/files."""
    if not outcome.passed:
        failures = [describe_failure(f) for f in outcome.failed if f["severity"] == "fail"]
        raise ValidationFailed(failures, str(outcome.summary_json))


def run(root: Path, params: Params, tracker: StageTracker) -> dict[str, Any]:
    """Stage entry point: validate the prepared manifest; a failure stops the pipeline here.

    Only a passed validation leaves the per-split stamps the training stages require
    (`tasks/data/validated.py`); they are removed first, so a failed or crashed run leaves none.
    """

    cfg, data = params.validation, params.data
    tracker.log_params({"validate": cfg.model_dump()})
    out_dir = root / "reports" / "validate"
    clear_stamps(root)
    manifest_path = root / data.prepared_dir / "manifest.parquet"
    outcome = validate_dataset(manifest_path, root, out_dir, cfg, memo=root / MEMO)
    if outcome.passed:
        write_stamps(root, read_manifest(manifest_path))
    tracker.log_artifact(outcome.result_json, "validation")
    tracker.log_artifact(outcome.docs_index.parent, "data_docs")
    report = {
        "passed": outcome.passed,
        "expectations": outcome.expectations,
        "failed": outcome.failed,
        "failed_count": sum(f["severity"] == "fail" for f in outcome.failed),
        "warnings": [describe_failure(f) for f in outcome.failed if f["severity"] == "warn"],
        "docs_index": str(outcome.docs_index.relative_to(root)),
    }
    tracker.log_metrics(
        {
            "passed": float(outcome.passed),
            "failed_count": report["failed_count"],
            "warning_count": len(report["warnings"]),
        }
    )
    if not outcome.passed:
        try:
            raise_if_failed(outcome)
        except ValidationFailed as exc:
            exc.report = report
            raise
    return report
