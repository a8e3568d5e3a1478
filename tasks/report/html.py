"""reports/index.html: one self-contained page with the numbers and figures of a pipeline run.

The markup lives in Jinja2 templates beside this module (`templates/`: the page, one template per
section, shared macros and the CSS), so the page can be changed without reading Python. This module
only gathers: for each section a small dict of the numbers, texts and figures its template shows
(a "view"), or a `Note` saying why the section has nothing to show. Number formatting is done in
the templates with the filters `num`, `pm`, `interval` and `version`.

The page holds everything itself: the figures as base64 PNG data URIs, the CSS inline, no
JavaScript at all, and a Content-Security-Policy that forbids loading anything else, so it opens
from disk, from an MLflow artifact or an e-mail attachment, with no server and no network.

It reads the `evaluate` stage's dict plus reports/student.json, reports/detector.json and
reports/validate.json, and the compare stage's summary when its caller has one. A report that
is missing or unreadable, or a section whose shape is not what this module expects, shows as a
short "not run" / "could not be shown" note; building the page never fails because a stage did
not run. All text from the reports is escaped (every `{{ }}` of the templates, `_finalize`).
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, TemplateError, Undefined
from markupsafe import Markup

from ms2rgb.tasks.data.atomic import write_text_atomic
from ms2rgb.tasks.report.compare import compare_cells
from ms2rgb.tasks.report.figures import FIGURE_CAPTIONS

TEMPLATES = Path(__file__).with_name("templates")  # package data (pyproject: tool.setuptools.package-data)
REPORTS_DIR = "reports"
INDEX_FILE = "index.html"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SECTIONS: dict[str, str] = {  # id (= its template, templates/<id>.html.j2) -> heading, in page order
    "summary": "Headline",
    "method-a": "Method A: the production student, distilled from the MS teacher",
    "compare": "Method A comparison: student variants under several RGB label budgets",
    "method-b": "Method B: few-shot prompt tuning of a frozen CLIP",
    "figures": "Figures",
    "validation": "Data validation",
    "promotion": "Model promotion",
    "lineage": "Lineage",
}
DECISIONS = ("first", "promoted", "held", "forced")  # decisions with a badge colour of their own
MISSING = "is missing"
WIDE_FIGURES = {"per_class", "detector_overlays", "index_maps", "accuracy_by_k"}
COMPARE_FIGURE = "accuracy_by_k"  # shown in the comparison section, beside its table, not among the figures
# What a section's body may raise on a report of an unexpected shape: shown as a note, the page goes on.
SHAPE_ERRORS = (KeyError, TypeError, ValueError, AttributeError, IndexError, TemplateError)


@dataclass(frozen=True)
class Note:
    """A short boxed remark in place of a section's body: `not-run` (amber) or `error` (red)."""

    text: str
    kind: str = "not-run"


View = Mapping[str, Any] | Note


# ---------------------------------------------------------------- filters the templates format with


def _defined(value: Any) -> Any:
    """A missing key of a report (Jinja's Undefined) counts as None."""
    return None if isinstance(value, Undefined) else value


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def num(value: Any, digits: int = 3) -> str:
    """A number with `digits` decimals (integers as they are); '–' for None, NaN or infinity."""
    value = _defined(value)
    if _is_number(value):
        return str(value) if isinstance(value, int) else f"{value:.{digits}f}"
    if value is None or isinstance(value, float):
        return "–"
    return str(value)


def pm(mean: Any, std: Any, digits: int = 3) -> str:
    """'mean ± std', or the mean alone when there is no std."""
    return f"{num(mean, digits)} ± {num(std, digits)}" if _is_number(_defined(std)) else num(mean, digits)


def interval(bounds: Any, digits: int = 3) -> str:
    """'[lo, hi]' from a two-element list, '–' otherwise."""
    bounds = _defined(bounds)
    if isinstance(bounds, Sequence) and not isinstance(bounds, str) and len(bounds) == 2:
        return f"[{num(bounds[0], digits)}, {num(bounds[1], digits)}]"
    return "–"


def version(value: Any) -> str:
    """A registered model version as 'v3', '–' when there is none."""
    value = _defined(value)
    return "–" if value is None else f"v{value}"


def wbr(header: Any) -> Markup:
    """A column header that may break after an underscore (variant names like kd_random_pairs)."""
    return Markup(html.escape(str(header), quote=True).replace("_", "_<wbr>"))


def _finalize(value: Any) -> Any:
    """Every `{{ }}`: markup (macros, `wbr`) as it is, anything else escaped; a missing value as '–'."""
    value = _defined(value)
    if value is None:
        return "–"
    if hasattr(value, "__html__"):
        return value
    return Markup(html.escape(str(value), quote=True))


@cache
def environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=True,
        finalize=_finalize,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(num=num, pm=pm, interval=interval, version=version, wbr=wbr)
    return env


# ---------------------------------------------------------------- reading


def read_report(root: Path, stage: str) -> tuple[dict[str, Any] | None, str]:
    """reports/<stage>.json as a dict, or (None, why not)."""
    path = Path(root) / REPORTS_DIR / f"{stage}.json"
    if not path.is_file():
        return None, f"{REPORTS_DIR}/{stage}.json {MISSING}"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return None, f"{REPORTS_DIR}/{stage}.json could not be read: {exc}"
    if not isinstance(data, dict):
        return None, f"{REPORTS_DIR}/{stage}.json holds no report object"
    return data, ""


def png_data_uri(path: Path) -> str | None:
    """The PNG at `path` as a data URI, or None when it is missing or not a PNG."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None
    if not data.startswith(PNG_MAGIC):
        return None
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _mapping(value: Any, what: str) -> Mapping[str, Any]:
    """A report section as a mapping ({} when absent); another shape is an error the section shows."""
    value = value or {}
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} is a {type(value).__name__}, not a mapping")
    return value


def not_run(what: str, why: str) -> Note:
    return Note(f"not run: {what} ({why})")


def unavailable(what: str, why: str) -> Note:
    """A stage whose report is missing did not run; one whose report is unreadable did, and that is an error."""
    return not_run(what, why) if why.endswith(MISSING) else Note(f"{what}: {why}", "error")


# ---------------------------------------------------------------- one view per section


def headline(evaluation: Mapping[str, Any]) -> View:
    """The four headline numbers (cards) and the details behind them."""
    if not evaluation:
        return not_run("evaluate", "no evaluation results")
    view = {name: _mapping(evaluation.get(name), name) for name in ("student", "teacher", "matcher", "detector")}
    seconds = evaluation.get("seconds")
    view["rgb_only"] = _mapping(evaluation.get("rgb_only"), "rgb_only")
    return {**view, "seconds": seconds if _is_number(seconds) else None}


def per_class(columns: Mapping[str, Mapping[str, Any] | None]) -> dict[str, Any]:
    """Classes (rows) × variants (columns) from {variant: {class: value}}: ten classes fit a page, names do not."""
    classes: list[str] = []
    for values in columns.values():
        classes += [c for c in (values or {}) if c not in classes]
    rows = [(c, [(values or {}).get(c) for values in columns.values()]) for c in classes]
    return {"columns": list(columns), "rows": rows}


def method_a(student: Mapping[str, Any] | None, why: str) -> View:
    """The production student: test accuracy with its interval, the label budget, the re-matching rounds."""
    if student is None:
        return unavailable("student stage", why)
    if "test_accuracy" not in student:
        return Note("the student report holds no test_accuracy: run the student stage again", "error")
    k = student.get("rgb_labels_per_class")
    return {
        "student": student,
        "k": "all" if k is None else k,
        "rounds": [_mapping(r, "rematch_rounds") for r in student.get("rematch_rounds") or []],
        "per_class": per_class({"full method": student["per_class"]}) if student.get("per_class") else None,
    }


def _k_order(k: str) -> float:
    try:
        return float(k)
    except ValueError:
        return math.inf


def _variant(name: str, k: Any, brief: Mapping[str, Any], miou: Any, highlight: bool = False) -> dict[str, Any]:
    """One detector variant's row of the method B table."""
    return {
        "name": name,
        "k": k,
        "miou": miou,
        "miou_std": brief.get("miou_std"),
        "pixel_accuracy": brief.get("pixel_accuracy"),
        "ci95": brief.get("miou_ci95") or [None, None],
        "seeds": brief.get("seeds"),
        "trainable_params": brief.get("trainable_params"),
        "train_seconds": brief.get("train_seconds"),
        "peak_memory_mb": brief.get("peak_memory_mb"),
        "tiles_per_second": brief.get("tiles_per_second"),
        "stopped_by": brief.get("stopped_by") or "–",
        "highlight": highlight,
    }


def _winners(detector: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The compared variants that score above the full method, best first: said plainly on the page."""
    beats = (detector.get("goal") or {}).get("beats") or {}
    baselines = detector.get("baselines") or {}
    head = detector.get("miou")
    if head is None:
        return []
    lost = sorted((name for name, won in beats.items() if not won and name in baselines), key=lambda n: -baselines[n])
    return [{"name": name, "miou": baselines[name], "points": 100 * (baselines[name] - head)} for name in lost]


def _open_vocabulary(detector: Mapping[str, Any]) -> dict[str, Any] | None:
    """Base / novel / harmonic-mean mIoU rows of reports/detector.json `open_vocabulary`."""
    found = detector.get("open_vocabulary") or {}
    rows = [{"name": name, **values} for name, values in found.items() if isinstance(values, Mapping)]
    return {"novel": found.get("novel_classes") or [], "rows": rows} if rows else None


def method_b(detector: Mapping[str, Any] | None, why: str) -> View:
    """The full method at every K and the baselines at the largest K, mIoU ± std over seeds, and the goal."""
    if detector is None:
        return unavailable("detector stage", why)
    by_shots = detector.get("by_shots") or {}
    details = detector.get("baseline_details") or {}
    largest = detector.get("shots")
    rows, iou = [], {}
    for k in sorted(by_shots, key=_k_order):
        brief = by_shots[k] or {}
        parts = "coupled prompts + pixel evidence" if brief.get("evidence_weight") is not None else "coupled prompts"
        name = f"full method ({parts}), K={k}"
        rows.append(_variant(name, k, brief, brief.get("miou"), str(k) == str(largest)))
        iou[name] = brief.get("per_class_iou") or {}
    for name, miou in (detector.get("baselines") or {}).items():
        brief = details.get(name) or {}
        shots = 0 if name == "zero_shot" else largest
        rows.append(_variant(name, shots if shots is not None else "–", brief, brief.get("miou", miou)))
        iou[name] = brief.get("per_class_iou") or {}
    if not rows:
        return Note("the detector report holds no by_shots or baselines", "error")
    goal = detector.get("goal")
    return {
        "clip_model": detector.get("clip_model", "–"),
        "weights": detector.get("weights", "–"),
        "rows": rows,
        "goal": goal if isinstance(goal, Mapping) else None,
        "winners": _winners(detector),
        "open_vocabulary": _open_vocabulary(detector),
        "stops": detector.get("loss_threshold_stops"),
        "per_class": per_class(iou) if any(iou.values()) else None,
    }


def figure(name: str, path: Path) -> dict[str, Any]:
    """One figure: its PNG as a data URI (None when missing or not a PNG) and its caption."""
    caption = FIGURE_CAPTIONS.get(name, name)
    return {"name": name, "caption": caption, "wide": name in WIDE_FIGURES, "uri": png_data_uri(path)}


def method_a_comparison(compare: Mapping[str, Any] | None, figure_path: Path | None) -> View:
    """Every variant at every label budget K against the baseline (paired Δ with its interval), and the figure."""
    if compare is None:
        return Note("not run: the compare stage runs with `ms2rgb run` / `dvc repro` (reports/compare.json)")
    headers, rows = compare_cells(compare)
    return {
        "baseline": compare["baseline"],
        "headers": headers,
        "rows": [{"cells": row, "beats": bool(row[-1])} for row in rows],
        "figure_name": COMPARE_FIGURE,
        "figure": None if figure_path is None else figure(COMPARE_FIGURE, figure_path),
    }


def figures_section(figures: Mapping[str, Path]) -> View:
    """Each figure with its caption, in FIGURE_CAPTIONS order (others after)."""
    figures = {name: path for name, path in figures.items() if name != COMPARE_FIGURE}
    if not figures:
        return not_run("figures", "no figures were drawn")
    order = [n for n in FIGURE_CAPTIONS if n in figures] + [n for n in figures if n not in FIGURE_CAPTIONS]
    return {"figures": [figure(name, figures[name]) for name in order]}


def _offending(failure: Mapping[str, Any], shown: int = 5) -> str:
    ids = [str(i) for i in failure.get("offending") or []]
    files = failure.get("files") or []
    named = [f"{i} ({f})" if k < len(files) else i for k, (i, f) in enumerate(zip(ids, [*files, *[""] * len(ids)]))]
    more = int(failure.get("count") or len(ids)) - min(len(ids), shown)
    text = ", ".join(named[:shown]) + (f" (+{more} more)" if more > 0 else "")
    if not text and "observed" in failure:
        text = f"observed {failure['observed']!r}"
    return text or "–"


def validation(report: Mapping[str, Any] | None, why: str) -> View:
    """Passed or not, how many expectations, and every failed one with what it caught."""
    if report is None:
        return unavailable("validate stage", why)
    failed = report.get("failed") or []
    warned = sum(f.get("severity") == "warn" for f in failed)
    rows = [
        {
            "batch": f.get("batch", "–"),
            "expectation": f.get("expectation", "–"),
            "column": f.get("column") or "–",
            "severity": f.get("severity", "fail"),
            "count": f.get("count"),
            "offending": _offending(f),
            "error": f.get("error"),
        }
        for f in failed
    ]
    return {
        "passed": report.get("passed"),
        "expectations": report.get("expectations"),
        "failures": len(failed) - warned,
        "warnings": warned,
        "docs_index": report.get("docs_index"),
        "rows": rows,
    }


def promotion(decisions: Mapping[str, Any] | None) -> View:
    """One row per registered model: decision, champion and challenger versions, reasons, metrics."""
    if not decisions:
        return not_run("promotion", "no promotion decisions in the evaluation")
    rows = []
    for model, d in decisions.items():
        d = d or {}
        decision = str(d.get("decision", "–"))
        listed = d.get("reasons") or []
        metrics = d.get("metrics") or {}
        challenger, champion = metrics.get("challenger") or {}, metrics.get("champion") or {}
        names = list(challenger) + [k for k in champion if k not in challenger]
        rows.append(
            {
                "model": model,
                "decision": decision,
                "badge": decision if decision in DECISIONS else "",
                "champion": d.get("champion"),
                "challenger": d.get("challenger"),
                "reasons": [listed] if isinstance(listed, str) else list(listed),
                "metrics": [(n, challenger.get(n), champion.get(n)) for n in names],
            }
        )
    return {"rows": rows}


def lineage(lineage_info: Mapping[str, Any] | None) -> View:
    """Git commit, CLIP weights, DVC data hashes, MLflow run ids and the params (collapsed)."""
    if not lineage_info:
        return not_run("lineage", "no lineage in the evaluation")
    params = lineage_info.get("params")
    return {
        "commit": lineage_info.get("git_commit"),
        "clip_weights": lineage_info.get("clip_weights") or "–",
        "dvc_data": _mapping(lineage_info.get("dvc_data"), "dvc_data"),
        "runs": _mapping(lineage_info.get("mlflow_run_ids"), "mlflow_run_ids"),
        "params": None if params is None else json.dumps(params, indent=2, sort_keys=True, default=str),
    }


# ---------------------------------------------------------------- the page


def section_html(section_id: str, view: View) -> str:
    """One <section> from its view (templates/section.html.j2, which includes templates/<id>.html.j2)."""
    template = environment().get_template("section.html.j2")
    note = view if isinstance(view, Note) else None
    values = {} if isinstance(view, Note) else dict(view)
    return template.render(values, id=section_id, title=SECTIONS[section_id], note=note)


def _section(section_id: str, gather: Callable[[], View]) -> Markup:
    """A section whose report has an unexpected shape shows why instead of failing the page."""
    try:
        return Markup(section_html(section_id, gather()))
    except SHAPE_ERRORS as exc:
        return Markup(section_html(section_id, Note(f"could not be shown: {type(exc).__name__}: {exc}", "error")))


def render(
    evaluation: Mapping[str, Any],
    figures: Mapping[str, Path],
    reports: Mapping[str, tuple[dict[str, Any] | None, str]],
    compare: Mapping[str, Any] | None = None,
) -> str:
    """The whole page as text.

    `reports` maps student/detector/validate to (report or None, why not); `compare` is the compare
    stage's summary, or None when it has not run.
    """
    evaluation = evaluation or {}
    lineage_info = evaluation.get("lineage") or {}
    views: dict[str, Callable[[], View]] = {
        "summary": lambda: headline(evaluation),
        "method-a": lambda: method_a(*reports["student"]),
        "compare": lambda: method_a_comparison(compare, figures.get(COMPARE_FIGURE)),
        "method-b": lambda: method_b(*reports["detector"]),
        "figures": lambda: figures_section(figures),
        "validation": lambda: validation(*reports["validate"]),
        "promotion": lambda: promotion(evaluation.get("promotion")),
        "lineage": lambda: lineage(lineage_info),
    }
    sections = [{"id": sid, "title": SECTIONS[sid], "html": _section(sid, view)} for sid, view in views.items()]
    commit = lineage_info.get("git_commit") if isinstance(lineage_info, Mapping) else None
    return environment().get_template("index.html.j2").render(sections=sections, commit=commit) + "\n"


def build_report(
    root: Path, evaluation: dict, figures: dict[str, Path], compare: Mapping[str, Any] | None = None
) -> Path:
    """Write reports/index.html under `root` from the evaluation, the figures and the stage reports.

    `compare` is the compare stage's summary (reports/compare.json, read by the caller), or None.
    """
    root = Path(root)
    reports = {stage: read_report(root, stage) for stage in ("student", "detector", "validate")}
    page = render(evaluation, figures, reports, compare)
    return write_text_atomic(root / REPORTS_DIR / INDEX_FILE, page)
