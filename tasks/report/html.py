"""reports/index.html: one self-contained page with the numbers and figures of a pipeline run.

The page holds everything itself: the figures as base64 PNG data URIs, the CSS inline, no
JavaScript at all, and a Content-Security-Policy that forbids loading anything else, so it opens
from disk, from an MLflow artifact or an e-mail attachment, with no server and no network.

It reads the `evaluate` stage's dict plus reports/student.json, reports/detector.json and
reports/validate.json, and the compare stage's summary when its caller has one. A report that
is missing or unreadable, or a section whose shape is not what this module expects, shows as a
short "not run" / "could not be shown" note; building the page never fails because a stage did
not run. All text from the reports is escaped.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

from ms2rgb.tasks.data.atomic import write_text_atomic
from ms2rgb.tasks.report.compare import compare_cells
from ms2rgb.tasks.report.figures import FIGURE_CAPTIONS

REPORTS_DIR = "reports"
INDEX_FILE = "index.html"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SECTIONS: dict[str, str] = {  # id -> heading, in page order
    "summary": "Headline",
    "method-a": "Method A: the production student, distilled from the MS teacher",
    "compare": "Method A comparison: student variants under several RGB label budgets",
    "method-b": "Method B: few-shot prompt tuning of a frozen CLIP",
    "figures": "Figures",
    "validation": "Data validation",
    "promotion": "Model promotion",
    "lineage": "Lineage",
}
DECISIONS = ("first", "promoted", "held", "forced")
MISSING = "is missing"

CSS = """
:root { --fg:#1d2330; --muted:#5b6474; --line:#d9dee7; --band:#f5f7fa; --accent:#1f5fae;
        --ok:#1e7a3c; --bad:#b3261e; --warn:#9a6700; }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;
       color:var(--fg); background:#fff; }
header { background:#16263f; color:#fff; padding:18px 32px; }
header h1 { margin:0 0 4px; font-size:22px; }
header p { margin:0; color:#c6d1e3; font-size:13px; }
header code { color:#fff; }
nav { position:sticky; top:0; z-index:1; background:#fff; border-bottom:1px solid var(--line);
      padding:8px 32px; font-size:13px; }
nav a { color:var(--accent); text-decoration:none; margin-right:16px; white-space:nowrap; }
main { max-width:1160px; margin:0 auto; padding:8px 32px 48px; }
section { padding-top:8px; border-bottom:1px solid var(--line); padding-bottom:16px; }
section:last-child { border-bottom:0; }
h2 { font-size:19px; margin:22px 0 10px; }
h3 { font-size:15px; margin:18px 0 6px; }
p { margin:6px 0; }
.muted { color:var(--muted); font-size:13px; }
.cards { display:grid; grid-template-columns:repeat(auto-fit,minmax(200px,1fr)); gap:12px; margin:12px 0 16px; }
.card { border:1px solid var(--line); border-radius:8px; padding:10px 14px; background:var(--band); }
.card .label { color:var(--muted); font-size:12px; text-transform:uppercase; letter-spacing:.04em; }
.card .value { font-size:26px; font-weight:600; font-variant-numeric:tabular-nums; }
.card .sub { color:var(--muted); font-size:12px; }
.table-wrap { overflow-x:auto; margin:6px 0 10px; }
table { border-collapse:collapse; font-size:13.5px; font-variant-numeric:tabular-nums; }
th, td { border-bottom:1px solid var(--line); padding:5px 10px; text-align:left; vertical-align:top; }
th { background:var(--band); font-weight:600; white-space:nowrap; }
td.num, th.num { text-align:right; white-space:nowrap; }
tr.highlight td { background:#eef4fc; font-weight:600; }
table.inner { font-size:12px; }
table.per-class th { white-space:normal; max-width:120px; vertical-align:bottom; }
table.inner th, table.inner td { padding:2px 6px; border-bottom:0; background:none; }
ul.reasons { margin:0; padding-left:18px; }
.badge { display:inline-block; padding:1px 8px; border-radius:10px; font-size:12px; font-weight:600;
         color:#fff; background:var(--muted); white-space:nowrap; }
.badge.ok, .badge.promoted { background:var(--ok); }
.badge.bad { background:var(--bad); }
.badge.held { background:var(--warn); }
.badge.first { background:var(--accent); }
.badge.forced { background:#6f42c1; }
.note { border-left:4px solid var(--line); background:var(--band); padding:6px 12px; margin:8px 0;
        color:var(--muted); }
.note.not-run { border-left-color:var(--warn); }
.note.error { border-left-color:var(--bad); }
.figures { display:grid; grid-template-columns:repeat(auto-fit,minmax(440px,1fr)); gap:18px; align-items:start; }
figure { margin:0; border:1px solid var(--line); border-radius:8px; padding:10px; background:#fff; }
figure.wide { grid-column:1 / -1; }
figure img { display:block; max-width:100%; height:auto; margin:0 auto; }
figcaption { color:var(--muted); font-size:12.5px; margin-top:6px; }
details { margin:8px 0; }
summary { cursor:pointer; color:var(--accent); }
pre { background:var(--band); border:1px solid var(--line); border-radius:6px; padding:10px; overflow-x:auto;
      font-size:12px; }
code { font-family:ui-monospace,"DejaVu Sans Mono",monospace; font-size:12.5px; }
"""
WIDE_FIGURES = {"per_class", "detector_overlays", "index_maps", "accuracy_by_k"}
COMPARE_FIGURE = "accuracy_by_k"  # shown in the comparison section, beside its table, not among the figures


# ---------------------------------------------------------------- small pieces


def esc(value: Any) -> str:
    """Any value as escaped text (quotes too, so it is safe inside attributes)."""
    return escape(str(value), quote=True)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def num(value: Any, digits: int = 3) -> str:
    """A number with `digits` decimals (integers as they are); '–' for None, NaN or infinity; text escaped."""
    if _is_number(value):
        return str(value) if isinstance(value, int) else f"{value:.{digits}f}"
    if value is None or isinstance(value, float):
        return "–"
    return esc(value)


def pm(mean: Any, std: Any, digits: int = 3) -> str:
    """'mean ± std', or the mean alone when there is no std."""
    return f"{num(mean, digits)} ± {num(std, digits)}" if _is_number(std) else num(mean, digits)


def interval(bounds: Any, digits: int = 3) -> str:
    """'[lo, hi]' from a two-element list, '–' otherwise."""
    if isinstance(bounds, Sequence) and not isinstance(bounds, str) and len(bounds) == 2:
        return f"[{num(bounds[0], digits)}, {num(bounds[1], digits)}]"
    return "–"


def yes_no(flag: Any) -> str:
    """A green yes, a red no, or a grey unknown badge."""
    if flag is None:
        return '<span class="badge">unknown</span>'
    return '<span class="badge ok">yes</span>' if flag else '<span class="badge bad">no</span>'


def note(text: str, kind: str = "not-run") -> str:
    """A short boxed remark: `not-run` (amber) or `error` (red)."""
    return f'<p class="note {kind}">{esc(text)}</p>'


def not_run(what: str, why: str) -> str:
    return note(f"not run: {what} ({why})")


def unavailable(what: str, why: str) -> str:
    """A stage whose report is missing did not run; one whose report is unreadable did, and that is an error."""
    return not_run(what, why) if why.endswith(MISSING) else note(f"{what}: {why}", "error")


def table(
    headers: Sequence[str],
    rows: Iterable[Sequence[str]],
    numeric: Iterable[int] = (),
    css: str = "",
    highlighted: Iterable[int] = (),
) -> str:
    """A table from already-escaped cell HTML; columns in `numeric` right-aligned, rows in `highlighted` bold."""
    right, marked = set(numeric), set(highlighted)
    # a header may break after an underscore (variant names like kd_random_pairs in narrow columns)
    head = "".join(
        f"<th{' class=num' if i in right else ''}>{esc(h).replace('_', '_<wbr>')}</th>" for i, h in enumerate(headers)
    )
    body = []
    for r, row in enumerate(rows):
        cells = "".join(f"<td{' class=num' if i in right else ''}>{cell}</td>" for i, cell in enumerate(row))
        body.append(f"<tr{' class=highlight' if r in marked else ''}>{cells}</tr>")
    table_cls = f' class="{css}"' if css else ""
    html = f"<table{table_cls}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    return html if css == "inner" else f'<div class="table-wrap">{html}</div>'


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


# ---------------------------------------------------------------- sections


def headline(evaluation: Mapping[str, Any]) -> str:
    """Cards with the four headline numbers, then a table with the details behind them."""
    if not evaluation:
        return not_run("evaluate", "no evaluation results")
    student = evaluation.get("student") or {}
    teacher = evaluation.get("teacher") or {}
    matcher = evaluation.get("matcher") or {}
    detector = evaluation.get("detector") or {}
    rgb_only = evaluation.get("rgb_only") or {}
    cards = [
        ("student accuracy (RGB)", student, "accuracy", f"95 % CI {interval(student.get('accuracy_ci95'))}"),
        ("teacher accuracy (MS)", teacher, "accuracy", f"95 % CI {interval(teacher.get('accuracy_ci95'))}"),
        ("matcher pair top-1", matcher, "pair_top1", f"top-5 {num(matcher.get('pair_top5'))}"),
        ("detector mIoU", detector, "miou", f"pixel accuracy {num(detector.get('pixel_accuracy'))}"),
    ]
    card_html = "".join(
        f'<div class="card"><div class="label">{esc(label)}</div><div class="value">{num(section.get(key))}</div>'
        f'<div class="sub">{sub if section else "not run"}</div></div>'
        for label, section, key, sub in cards
    )

    def version(section: Mapping[str, Any]) -> str:
        v = section.get("version")
        return f"v{esc(v)}" if v is not None else "–"

    def tiles(section: Mapping[str, Any]) -> str:
        return num(section.get("test_tiles"))

    rows: list[list[str]] = []
    if student:
        rows += [
            [
                "student (RGB, distilled)",
                version(student),
                "accuracy",
                num(student.get("accuracy")),
                interval(student.get("accuracy_ci95")),
                tiles(student),
            ],
            ["", "", "macro-F1", num(student.get("macro_f1")), "–", ""],
            ["", "", "ECE (lower is better)", num(student.get("ece")), "–", ""],
        ]
    else:
        rows.append(["student (RGB, distilled)", "–", "not run", "–", "–", "–"])
    if rgb_only:
        rows.append(
            [
                f"RGB-only baseline (compare, K = {esc(rgb_only.get('k'))})",
                "–",
                "accuracy, mean ± std over seeds",
                pm(rgb_only.get("accuracy"), rgb_only.get("std")),
                "–",
                "",
            ]
        )
    if teacher:
        rows += [
            [
                "teacher (13-band MS)",
                version(teacher),
                "accuracy",
                num(teacher.get("accuracy")),
                interval(teacher.get("accuracy_ci95")),
                tiles(teacher),
            ],
            ["", "", "macro-F1", num(teacher.get("macro_f1")), "–", ""],
        ]
    else:
        rows.append(["teacher (13-band MS)", "–", "not run", "–", "–", "–"])
    if matcher:
        rows += [
            ["matcher (RGB↔MS)", version(matcher), "pair top-1", num(matcher.get("pair_top1")), "–", ""],
            ["", "", "pair top-5", num(matcher.get("pair_top5")), "–", ""],
        ]
    else:
        rows.append(["matcher (RGB↔MS)", "–", "not run", "–", "–", "–"])
    if detector:
        rows += [
            ["detector (prompted CLIP)", version(detector), "mIoU", num(detector.get("miou")), "–", ""],
            ["", "", "pixel accuracy", num(detector.get("pixel_accuracy")), "–", ""],
        ]
    else:
        rows.append(["detector (prompted CLIP)", "–", "not run", "–", "–", "–"])
    headers = ["model", "version", "metric", "value", "95 % interval", "test tiles"]
    seconds = evaluation.get("seconds")
    took = f'<p class="muted">evaluation took {num(seconds, 1)} s</p>' if _is_number(seconds) else ""
    marked = (0,) if student else ()
    return f'<div class="cards">{card_html}</div>' + table(headers, rows, (3, 4, 5), highlighted=marked) + took


def per_class_table(columns: Mapping[str, Mapping[str, Any]], digits: int = 3) -> str:
    """Classes (rows) × variants (columns) from {variant: {class: value}}: ten classes fit a page, names do not."""
    classes: list[str] = []
    for values in columns.values():
        classes += [c for c in (values or {}) if c not in classes]
    body = [[esc(c), *(num((values or {}).get(c), digits) for values in columns.values())] for c in classes]
    return table(["class", *columns], body, numeric=range(1, len(columns) + 1), css="per-class")


def method_a(student: Mapping[str, Any] | None, why: str) -> str:
    """The production student: test accuracy with its interval, the label budget, the re-matching rounds."""
    if student is None:
        return unavailable("student stage", why)
    if "test_accuracy" not in student:
        return note("the student report holds no test_accuracy: run the student stage again", "error")
    k = student.get("rgb_labels_per_class")
    rows = [
        ["RGB test accuracy", num(student.get("test_accuracy")), interval(student.get("test_accuracy_ci95"))],
        ["test tiles", esc(student.get("test_tiles")), ""],
        ["labels per class (K)", esc("all" if k is None else k), ""],
        [
            "labelled / unlabelled training tiles",
            f"{esc(student.get('labelled_tiles'))} / {esc(student.get('unlabelled_tiles'))}",
            "",
        ],
        ["optimiser steps, seed", f"{esc(student.get('steps'))}, {esc(student.get('seed'))}", ""],
    ]
    parts = [table(["full method (production student)", "value", "95 % interval"], rows, (1, 2))]
    rounds = student.get("rematch_rounds") or []
    if rounds:
        body = [
            [
                esc(r.get("epoch")),
                num(r.get("changed")),
                num(r.get("same_class_rate")),
                num(r.get("pseudo_label_accuracy")),
            ]
            for r in rounds
        ]
        parts.append(
            "<p>Re-matching rounds: share of RGB tiles given a new MS partner, share of pairs whose partner's "
            "teacher class is the tile's hidden true class, and the pseudo-labels' accuracy on the unlabelled "
            "tiles.</p>"
            + table(["round", "share changed", "same-class rate", "pseudo-label accuracy"], body, (1, 2, 3))
        )
    if student.get("per_class"):
        parts.append(
            "<details><summary>per-class test accuracy</summary>"
            + per_class_table({"full method": student["per_class"]})
            + "</details>"
        )
    return "".join(parts)


def method_b(detector: Mapping[str, Any] | None, why: str) -> str:
    """The full method at every K and the baselines at the largest K, mIoU ± std over seeds, and the goal."""
    if detector is None:
        return unavailable("detector stage", why)
    by_shots = detector.get("by_shots") or {}
    details = detector.get("baseline_details") or {}
    largest = detector.get("shots")

    def k_order(k: str) -> float:
        try:
            return float(k)
        except ValueError:
            return math.inf

    rows: list[list[str]] = []
    per_class: dict[str, Mapping[str, Any]] = {}
    marked: list[int] = []
    for k in sorted(by_shots, key=k_order):
        r = by_shots[k] or {}
        name = f"full method (coupled prompts), K={k}"
        if str(k) == str(largest):
            marked.append(len(rows))
        rows.append(
            [
                esc(name),
                esc(k),
                pm(r.get("miou"), r.get("miou_std")),
                num(r.get("pixel_accuracy")),
                num(r.get("seeds")),
                num(r.get("trainable_params")),
                esc(r.get("stopped_by") or "–"),
            ]
        )
        per_class[name] = r.get("per_class_iou") or {}
    for name, miou in (detector.get("baselines") or {}).items():
        d = details.get(name) or {}
        shots = 0 if name == "zero_shot" else largest
        rows.append(
            [
                esc(name),
                esc(shots if shots is not None else "–"),
                pm(d.get("miou", miou), d.get("miou_std")),
                num(d.get("pixel_accuracy")),
                num(d.get("seeds")),
                num(d.get("trainable_params")),
                esc(d.get("stopped_by") or "–"),
            ]
        )
        per_class[name] = d.get("per_class_iou") or {}
    if not rows:
        return note("the detector report holds no by_shots or baselines", "error")
    headers = ["variant", "K", "mIoU (mean ± std)", "pixel accuracy", "seeds", "trainable params", "stopped by"]
    parts = [
        f'<p class="muted">CLIP <code>{esc(detector.get("clip_model", "–"))}</code>, weights '
        f"<code>{esc(detector.get('weights', '–'))}</code>; scored on the held-out seg_test tiles.</p>",
        table(headers, rows, numeric=(1, 2, 3, 4, 5), highlighted=marked),
    ]
    goal = detector.get("goal")
    if isinstance(goal, Mapping):
        parts.append(
            f"<p>Goal met: {yes_no(goal.get('met'))} &mdash; beats every baseline: "
            f"{yes_no(goal.get('beats_every_baseline'))}, {num(goal.get('points_over_zero_shot'), 1)} mIoU points "
            "over zero-shot.</p>"
        )
    if any(per_class.values()):
        parts.append("<details><summary>per-class IoU</summary>" + per_class_table(per_class) + "</details>")
    return "".join(parts)


def method_a_comparison(compare: Mapping[str, Any] | None, figure: Path | None) -> str:
    """Every variant at every label budget K against the baseline (paired Δ with its interval), and the figure."""
    if compare is None:
        return note("not run: the compare stage runs with `ms2rgb run` / `dvc repro` (reports/compare.json)")
    headers, rows = compare_cells(compare)
    beats = [i for i, row in enumerate(rows) if row[-1]]
    parts = [
        f'<p class="muted">Δ: mean accuracy difference to <code>{esc(compare["baseline"])}</code> with a paired '
        "95 % bootstrap interval over seeds and test tiles; ✓ (and bold) where the interval lies above 0.</p>",
        table(headers, ([esc(c) for c in row] for row in rows), numeric=(2, 3, 4), highlighted=beats),
    ]
    if figure is None:
        parts.append(note(f"figure {COMPARE_FIGURE} was not drawn", "error"))
    else:
        parts.append(f'<div class="figures">{figure_html(COMPARE_FIGURE, figure)}</div>')
    return "".join(parts)


def figure_html(name: str, path: Path) -> str:
    """One <figure>: the PNG as a data URI with its caption, or a note when the file is missing."""
    uri = png_data_uri(path)
    caption = FIGURE_CAPTIONS.get(name, name)
    wide = ' class="wide"' if name in WIDE_FIGURES else ""
    if uri is None:
        return f"<figure{wide}>{note(f'figure {name} is missing or not a PNG', 'error')}</figure>"
    return (
        f'<figure id="fig-{esc(name)}"{wide}><img src="{uri}" alt="{esc(caption)}">'
        f"<figcaption>{esc(caption)}</figcaption></figure>"
    )


def figures_section(figures: Mapping[str, Path]) -> str:
    """Each figure embedded as a data URI with its caption, in FIGURE_CAPTIONS order (others after)."""
    figures = {name: path for name, path in figures.items() if name != COMPARE_FIGURE}
    if not figures:
        return not_run("figures", "no figures were drawn")
    order = [n for n in FIGURE_CAPTIONS if n in figures] + [n for n in figures if n not in FIGURE_CAPTIONS]
    return f'<div class="figures">{"".join(figure_html(name, figures[name]) for name in order)}</div>'


def _offending(failure: Mapping[str, Any], shown: int = 5) -> str:
    ids = [str(i) for i in failure.get("offending") or []]
    files = failure.get("files") or []
    named = [f"{i} ({f})" if k < len(files) else i for k, (i, f) in enumerate(zip(ids, [*files, *[""] * len(ids)]))]
    more = int(failure.get("count") or len(ids)) - min(len(ids), shown)
    text = ", ".join(named[:shown]) + (f" (+{more} more)" if more > 0 else "")
    if not text and "observed" in failure:
        text = f"observed {failure['observed']!r}"
    return esc(text or "–")


def validation(report: Mapping[str, Any] | None, why: str) -> str:
    """Passed or not, how many expectations, and every failed one with what it caught."""
    if report is None:
        return unavailable("validate stage", why)
    passed = report.get("passed")
    failed = report.get("failed") or []
    warned = sum(f.get("severity") == "warn" for f in failed)
    badge = '<span class="badge ok">passed</span>' if passed else '<span class="badge bad">failed</span>'
    counts = f"{esc(len(failed) - warned)} failed, {esc(warned)} warning(s) (severity warn: reported, not stopping)"
    parts = [f"<p>{badge} {num(report.get('expectations'))} expectations evaluated, {counts}.</p>"]
    if report.get("docs_index"):
        parts.append(f'<p class="muted">Great Expectations Data Docs: <code>{esc(report["docs_index"])}</code></p>')
    if failed:
        rows = [
            [
                esc(f.get("batch", "–")),
                esc(f.get("expectation", "–")),
                esc(f.get("column") or "–"),
                esc(f.get("severity", "fail")),
                num(f.get("count")),
                _offending(f) + (f"<br><span class=muted>{esc(f['error'])}</span>" if f.get("error") else ""),
            ]
            for f in failed
        ]
        parts.append(
            table(["batch", "expectation", "column", "severity", "count", "offending (ids, files)"], rows, (4,))
        )
    return "".join(parts)


def _metrics_table(metrics: Mapping[str, Any]) -> str:
    challenger = metrics.get("challenger") or {}
    champion = metrics.get("champion") or {}
    names = list(challenger) + [k for k in champion if k not in challenger]
    if not names:
        return "–"
    rows = [[esc(n), num(challenger.get(n)), num(champion.get(n))] for n in names]
    return table(["metric", "challenger", "champion"], rows, numeric=(1, 2), css="inner")


def promotion(decisions: Mapping[str, Any] | None) -> str:
    """One row per registered model: decision, champion and challenger versions, reasons, metrics."""
    if not decisions:
        return not_run("promotion", "no promotion decisions in the evaluation")
    rows = []
    for model, d in decisions.items():
        d = d or {}
        decision = str(d.get("decision", "–"))
        cls = decision if decision in DECISIONS else ""
        listed = d.get("reasons") or []
        reasons = "".join(f"<li>{esc(r)}</li>" for r in ([listed] if isinstance(listed, str) else listed))
        rows.append(
            [
                f"<code>{esc(model)}</code>",
                f'<span class="badge {cls}">{esc(decision)}</span>',
                f"v{esc(d['champion'])}" if d.get("champion") is not None else "–",
                f"v{esc(d['challenger'])}" if d.get("challenger") is not None else "–",
                f'<ul class="reasons">{reasons}</ul>' if reasons else "–",
                _metrics_table(d.get("metrics") or {}),
            ]
        )
    return table(["registered model", "decision", "champion", "challenger", "reasons", "metrics"], rows, (2, 3))


def lineage(lineage_info: Mapping[str, Any] | None) -> str:
    """Git commit, CLIP weights, DVC data hashes, MLflow run ids and the params (collapsed)."""
    if not lineage_info:
        return not_run("lineage", "no lineage in the evaluation")
    commit = lineage_info.get("git_commit")
    parts = [
        table(
            ["what", "value"],
            [
                ["git commit", f"<code>{esc(commit)}</code>" if commit else "– (not a git checkout)"],
                ["CLIP weights", f"<code>{esc(lineage_info.get('clip_weights') or '–')}</code>"],
            ],
        )
    ]
    data = lineage_info.get("dvc_data") or {}
    parts.append("<h3>DVC data</h3>")
    parts.append(
        table(["path", "md5"], [[f"<code>{esc(p)}</code>", f"<code>{esc(h)}</code>"] for p, h in data.items()])
        if data
        else note("no DVC-tracked data recorded", "not-run")
    )
    runs = lineage_info.get("mlflow_run_ids") or {}
    parts.append("<h3>MLflow runs</h3>")
    parts.append(
        table(["stage", "run id"], [[esc(s), f"<code>{esc(r)}</code>"] for s, r in runs.items()])
        if runs
        else note("no MLflow run ids recorded", "not-run")
    )
    params = lineage_info.get("params")
    if params is not None:
        text = json.dumps(params, indent=2, sort_keys=True, default=str)
        parts.append(f"<details><summary>params (resolved)</summary><pre>{esc(text)}</pre></details>")
    return "".join(parts)


# ---------------------------------------------------------------- the page


def _section(section_id: str, body: Callable[[], str]) -> str:
    """One <section>; a body that cannot be drawn from its report shows why instead of failing the page."""
    try:
        html = body()
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        html = note(f"could not be shown: {type(exc).__name__}: {exc}", "error")
    return f'<section id="{section_id}"><h2>{esc(SECTIONS[section_id])}</h2>{html}</section>'


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
    commit = lineage_info.get("git_commit")
    bodies: dict[str, Callable[[], str]] = {
        "summary": lambda: headline(evaluation),
        "method-a": lambda: method_a(*reports["student"]),
        "compare": lambda: method_a_comparison(compare, figures.get(COMPARE_FIGURE)),
        "method-b": lambda: method_b(*reports["detector"]),
        "figures": lambda: figures_section(figures),
        "validation": lambda: validation(*reports["validate"]),
        "promotion": lambda: promotion(evaluation.get("promotion")),
        "lineage": lambda: lineage(lineage_info),
    }
    nav = "".join(f'<a href="#{sid}">{esc(title.split(":")[0])}</a>' for sid, title in SECTIONS.items())
    sections = "".join(_section(sid, body) for sid, body in bodies.items())
    subtitle = f"git commit <code>{esc(commit)}</code>" if commit else "no git commit recorded"
    csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        "<title>ms2rgb evaluation report</title>"
        f"<style>{CSS}</style></head><body>"
        f"<header><h1>ms2rgb evaluation report</h1><p>{subtitle}</p></header>"
        f"<nav>{nav}</nav><main>{sections}</main></body></html>\n"
    )


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
