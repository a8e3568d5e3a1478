"""The evaluation report (tasks/report/): figures from a constructed evaluation, and the HTML page.

Fast and hermetic: no pipeline, no browser (bench/report_screenshot.sh renders the page in
headless Chromium by hand). The sample dicts below have the shapes of reports/evaluate.json,
reports/student.json, reports/detector.json and reports/validate.json.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import REPO

from ms2rgb.tasks.data.classes import SCENE_NAMES, SURFACE_NAMES
from ms2rgb.tasks.report.compare import compare_summary
from ms2rgb.tasks.report.figures import FIGURE_CAPTIONS, detector_overlays, write_figures
from ms2rgb.tasks.report.html import SECTIONS, build_report

SECTION_IDS = ("summary", "method-a", "compare", "method-b", "figures", "validation", "promotion", "lineage")


def _per_class(rng: np.random.Generator, low: float, high: float) -> dict[str, float]:
    return {c: round(float(rng.uniform(low, high)), 3) for c in SCENE_NAMES}


def sample_evaluation(seed: int = 0) -> dict[str, Any]:
    """An evaluate.json-shaped dict with plausible numbers."""
    rng = np.random.default_rng(seed)
    n = len(SCENE_NAMES)
    confusion = (np.eye(n, dtype=int) * 40 + rng.integers(0, 5, (n, n))).tolist()
    edges = [round(0.1 * i, 1) for i in range(11)]
    count = [0, 0, 3, 12, 25, 40, 61, 88, 130, 241]
    confidence = [None, None, 0.27, 0.36, 0.45, 0.55, 0.65, 0.75, 0.85, 0.96]
    accuracy = [None, None, 0.33, 0.3, 0.41, 0.5, 0.62, 0.71, 0.84, 0.95]
    return {
        "student": {
            "version": 3,
            "accuracy": 0.812,
            "accuracy_ci95": [0.789, 0.834],
            "macro_f1": 0.803,
            "ece": 0.041,
            "per_class": _per_class(rng, 0.6, 0.95),
            "confusion": confusion,
            "class_names": SCENE_NAMES,
            "reliability": {"bin_edges": edges, "accuracy": accuracy, "confidence": confidence, "count": count},
            "test_tiles": 600,
        },
        "rgb_only": {"accuracy": 0.801, "std": 0.012, "k": "25"},
        "teacher": {
            "version": 2,
            "accuracy": 0.951,
            "accuracy_ci95": [0.933, 0.966],
            "macro_f1": 0.949,
            "per_class": _per_class(rng, 0.85, 1.0),
            "confusion": (np.eye(n, dtype=int) * 55 + rng.integers(0, 2, (n, n))).tolist(),
            "class_names": SCENE_NAMES,
            "test_tiles": 600,
        },
        "matcher": {"version": 1, "pair_top1": 0.42, "pair_top5": 0.77},
        "detector": {
            "version": 4,
            "miou": 0.512,
            "pixel_accuracy": 0.744,
            "per_class_iou": {
                s: (None if s == "roof" else round(float(rng.uniform(0.2, 0.8)), 3)) for s in SURFACE_NAMES
            },
            "miou_by_k": {"1": 0.31, "4": 0.42, "16": 0.512},
        },
        "promotion": {
            "ms2rgb-student": {
                "decision": "promoted",
                "champion": 3,
                "challenger": 3,
                "reasons": ["accuracy 0.812 >= champion 0.797 - 0.005", "ECE 0.041 <= 0.1"],
                "metrics": {
                    "challenger": {"accuracy": 0.812, "ece": 0.041},
                    "champion": {"accuracy": 0.797, "ece": 0.05},
                },
            },
            "ms2rgb-teacher": {
                "decision": "first",
                "champion": 2,
                "challenger": 2,
                "reasons": ["no champion yet"],
                "metrics": {"challenger": {"accuracy": 0.951}, "champion": None},
            },
            "ms2rgb-detector": {
                "decision": "held",
                "champion": 2,
                "challenger": 4,
                "reasons": ["mIoU 0.512 < champion 0.530 - 0.005"],
                "metrics": {"challenger": {"miou": 0.512}, "champion": {"miou": 0.53}},
            },
        },
        "lineage": {
            "git_commit": "0123456789abcdef0123456789abcdef01234567",
            "dvc_data": {
                "data/prepared": "6f1ed002ab5595859014ebf0951522d9.dir",
                "data/raw": "d41d8cd98f00b204e9800998ecf8427e.dir",
            },
            "params": {"seed": 7, "profile": "default", "student": {"epochs": 12, "w_kd": 1.0}},
            "mlflow_run_ids": {"teacher": "a" * 32, "student": "b" * 32, "evaluate": "c" * 32},
            "clip_weights": "fallback:ms2rgb-clip-backbone v1 (400 contrastive steps on captions)",
        },
        "seconds": 12.3,
    }


def sample_student_report() -> dict[str, Any]:
    rng = np.random.default_rng(1)
    return {
        "test_accuracy": 0.812,
        "test_accuracy_ci95": [0.79, 0.833],
        "test_tiles": 1500,
        "per_class": _per_class(rng, 0.6, 0.95),
        "labelled_tiles": 250,
        "unlabelled_tiles": 2750,
        "rgb_labels_per_class": 25,
        "seed": 7,
        "steps": 600,
        "rematch_rounds": [
            {
                "epoch": 3,
                "changed": 0.412,
                "same_class_rate": 0.733,
                "pseudo_label_accuracy": 0.7071,
                "mean_weight": 0.6,
            },
            {
                "epoch": 6,
                "changed": 0.118,
                "same_class_rate": 0.771,
                "pseudo_label_accuracy": 0.7493,
                "mean_weight": 0.7,
            },
        ],
    }


def sample_detector_report() -> dict[str, Any]:
    def brief(miou: float, std: float, seeds: int, params: int) -> dict[str, Any]:
        return {
            "miou": miou,
            "miou_std": std,
            "miou_ci95": [round(miou - 0.05, 3), round(miou + 0.05, 3)],
            "pixel_accuracy": miou + 0.2,
            "seeds": seeds,
            "trainable_params": params,
            "stopped_by": "max_steps",
            "steps": 200,
            "per_class_iou": {s: round(miou + 0.01 * i, 3) for i, s in enumerate(SURFACE_NAMES)},
            "runs": [],
        }

    return {
        "weights": "fallback:ms2rgb-clip-backbone v1",
        "clip_model": "ms2rgb-tiny-vit",
        "shots": 16,
        "seeds": 3,
        "miou": 0.512,
        "miou_std": 0.01,
        "by_shots": {"1": brief(0.31, 0.0, 1, 9000), "4": brief(0.42, 0.0, 1, 9000), "16": brief(0.512, 0.01, 3, 9000)},
        "baselines": {
            "zero_shot": 0.12,
            "text_prompts": 0.44,
            "visual_prompts": 0.40,
            "independent": 0.47,
            "pixel_forest": 0.645,
        },
        "baseline_details": {
            "zero_shot": brief(0.12, 0.0, 1, 0),
            "text_prompts": brief(0.44, 0.02, 3, 2048),
            "visual_prompts": brief(0.40, 0.03, 3, 4096),
            "independent": brief(0.47, 0.02, 3, 6144),
            "pixel_forest": brief(0.645, 0.001, 3, 617000),
        },
        "open_vocabulary": {
            "novel_classes": ["water", "roof"],
            "base_to_novel": {"base_miou": 0.505, "novel_miou": 0.098, "hm": 0.164},
        },
        "loss_threshold_stops": {"tuning_runs": 16, "stopped_by_threshold": 1, "steps_saved": 43},
        "goal": {
            "beats": {
                "zero_shot": True,
                "text_prompts": True,
                "visual_prompts": True,
                "independent": True,
                "pixel_forest": False,
            },
            "beats_every_baseline": False,
            "points_over_zero_shot": 39.2,
            "met": False,
        },
    }


def sample_validate_report(passed: bool = True) -> dict[str, Any]:
    failed = (
        []
        if passed
        else [
            {
                "batch": "tile_stats",
                "expectation": "expect_column_values_to_be_between",
                "column": "nan_share",
                "offending": ["t1", "t2"],
                "count": 9,
                "files": ["tiles/ms/Forest/t1.tif", "tiles/ms/Forest/t2.tif"],
            }
        ]
    )
    return {
        "passed": passed,
        "expectations": 57,
        "failed": failed,
        "failed_count": len(failed),
        "docs_index": "reports/validate/data_docs/index.html",
    }


def sample_overlays(n: int = 4, size: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8)
    masks = np.repeat(np.arange(size)[None, :, None] * len(SURFACE_NAMES) // size, size, axis=2)
    masks = np.broadcast_to(masks, (n, size, size)).astype(np.uint8).copy()
    masks[:, :4, :4] = 255  # no data
    preds = masks.copy()
    preds[:, size // 2 :, : size // 3] = 0
    preds[masks == 255] = 1
    return images, preds, masks, list(SURFACE_NAMES)


def sample_indices(n: int = 4, size: int = 32) -> np.ndarray:
    """(n, 3, size, size) float32 NDWI/NDVI/NDBI maps of the overlay tiles (scene tiles have them; synthetic
    ones do not)."""
    return np.random.default_rng(3).uniform(-1, 1, (n, 3, size, size)).astype(np.float32)


def sample_compare() -> dict[str, Any]:
    """A reports/compare.json-shaped summary: 2 K, 3 variants, 2 seeds, 40 tiles.

    rgb_only gets 24 and 26 tiles right (0.625 ± 0.035), full_method 4 more on each seed (Δ +0.100),
    no_rematch the same tiles as rgb_only (Δ +0.000); at "all" no_rematch did not run.
    """

    def first(*counts: int) -> np.ndarray:
        return (np.arange(40)[None, :] < np.array(counts)[:, None]).astype(float)  # (seeds, tiles)

    correct = {
        "5": {"rgb_only": first(24, 26), "full_method": first(28, 30), "no_rematch": first(24, 26)},
        "all": {"rgb_only": first(32, 32), "full_method": first(36, 36)},
    }
    return compare_summary(correct, "rgb_only", samples=300, seed=0)


def write_sample_project(root: Path, *, student: bool = True, detector: bool = True, passed: bool = True) -> Path:
    """reports/{student,detector,validate}.json under `root`, as the stages would leave them."""
    reports = root / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    if student:
        (reports / "student.json").write_text(json.dumps(sample_student_report()))
    if detector:
        (reports / "detector.json").write_text(json.dumps(sample_detector_report()))
    (reports / "validate.json").write_text(json.dumps(sample_validate_report(passed)))
    return root


@pytest.fixture(scope="module")
def figures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("figures")
    return write_figures(sample_evaluation(), out, sample_overlays(), sample_compare(), sample_indices())


def test_every_figure_is_written_as_a_png(figures: dict[str, Path]) -> None:
    assert list(figures) == list(FIGURE_CAPTIONS)  # all of them, in report order
    for name, path in figures.items():
        assert path.name == f"{name}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 5000, f"{name} looks empty"


def test_missing_sections_draw_no_figure(tmp_path: Path) -> None:
    evaluation = sample_evaluation()
    evaluation["detector"] = None
    del evaluation["teacher"]
    written = write_figures(evaluation, tmp_path, None)
    assert set(written) == {"student_confusion", "per_class", "reliability"}
    assert write_figures({}, tmp_path / "empty", None) == {}


def test_overlays_show_a_few_tiles_and_check_their_inputs() -> None:
    images, preds, masks, names = sample_overlays(n=9)
    fig = detector_overlays(images, preds, masks, names, tiles=3)
    assert len(fig.axes) == 3 * 4  # RGB | truth | prediction | errors per tile
    with pytest.raises(ValueError, match="as many"):
        detector_overlays(images, preds[:2], masks, names)


def test_page_holds_every_section_and_embeds_its_figures(tmp_path: Path, figures: dict[str, Path]) -> None:
    root = write_sample_project(tmp_path, passed=False)
    page = build_report(root, sample_evaluation(), figures, sample_compare())
    assert page == root / "reports" / "index.html"
    html = page.read_text(encoding="utf-8")
    for sid in SECTION_IDS:
        assert f'<section id="{sid}"><h2>' in html, sid
        assert SECTIONS[sid].split(":")[0] in html
    assert html.count("data:image/png;base64,") == len(figures)
    sources = re.findall(r'\bsrc="([^"]*)"', html)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r"<script|<link|href=\"https?:|url\(", html), "the page loads nothing from outside"
    assert "not run" not in html
    # the numbers made it in: headline CI, a baseline's mean ± std, the detector goal, a promotion, lineage
    assert "[0.789, 0.834]" in html
    assert "0.801 ± 0.012" in html
    assert "no_rematch" in html and "visual_prompts" in html and "39.2" in html  # a compared variant, a baseline
    assert "250 / 2750" in html and "0.749" in html  # the student's label budget and a re-matching round
    assert "ms2rgb-detector" in html and "held" in html and "mIoU 0.512 &lt; champion" in html
    assert "0123456789abcdef0123456789abcdef01234567" in html and "6f1ed002ab5595859014ebf0951522d9.dir" in html
    assert "<details><summary>params" in html and "fallback:ms2rgb-clip-backbone v1" in html
    # method B says plainly which baseline beats it, by how much, and shows open vocabulary and the stop rule
    assert "A baseline wins:</strong> <code>pixel_forest</code> 0.645 (13.3 mIoU points above" in html
    assert "[0.462, 0.562]" in html  # the full method's interval at K = 16
    assert "<td>base_to_novel</td><td class=num>0.505</td><td class=num>0.098</td><td class=num>0.164</td>" in html
    assert "1 of 16 tuning runs, 43 optimiser steps saved" in html
    assert "expect_column_values_to_be_between" in html and "(+7 more)" in html


def test_text_from_reports_is_escaped(tmp_path: Path) -> None:
    evil = '<script>alert("x")</script>'
    evaluation = sample_evaluation()
    evaluation["promotion"]["ms2rgb-student"]["reasons"] = [evil]
    evaluation["lineage"]["params"] = {"note": evil}
    evaluation["lineage"]["clip_weights"] = evil
    evaluation["student"]["per_class"] = {evil: 0.5}
    root = write_sample_project(tmp_path)
    student = sample_student_report()
    student["per_class"][evil] = 0.5
    (root / "reports" / "student.json").write_text(json.dumps(student))
    html = build_report(root, evaluation, {}).read_text(encoding="utf-8")
    assert "<script" not in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html


def test_missing_reports_show_not_run(tmp_path: Path) -> None:
    root = write_sample_project(tmp_path, student=False, detector=False)
    (root / "reports" / "validate.json").unlink()
    evaluation = sample_evaluation()
    evaluation["detector"] = None
    del evaluation["promotion"]
    html = build_report(root, evaluation, {}).read_text(encoding="utf-8")
    for sid in ("method-a", "compare", "method-b", "figures", "validation", "promotion"):
        body = html.split(f'<section id="{sid}">')[1].split("</section>")[0]
        assert "not run" in body, sid
    assert "not run: the compare stage runs with" in html
    assert "reports/student.json is missing" in html
    # a page from nothing at all still has every section
    empty = build_report(tmp_path / "nothing", {}, {}).read_text(encoding="utf-8")
    assert all(f'<section id="{sid}">' in empty for sid in SECTION_IDS)


def test_unreadable_reports_and_odd_shapes_do_not_break_the_page(tmp_path: Path) -> None:
    root = write_sample_project(tmp_path)
    (root / "reports" / "student.json").write_text("{not json")
    (root / "reports" / "detector.json").write_text(json.dumps({"by_shots": "oops", "baselines": {"zero_shot": 0.1}}))
    evaluation = sample_evaluation()
    evaluation["promotion"] = {"ms2rgb-student": {"decision": "promoted", "reasons": "not a list", "metrics": []}}
    missing = {"student_confusion": tmp_path / "gone.png"}
    html = build_report(root, evaluation, missing).read_text(encoding="utf-8")
    method_a = html.split('<section id="method-a">')[1].split("</section>")[0]
    assert "student.json could not be read" in method_a and "not run" not in method_a  # it ran; its file is bad
    assert "figure student_confusion is missing" in html
    assert all(f'<section id="{sid}">' in html for sid in SECTION_IDS)


def _section_body(html: str, sid: str) -> str:
    return html.split(f'<section id="{sid}">')[1].split("</section>")[0]


def test_comparison_section_shows_every_k_and_variant(tmp_path: Path, figures: dict[str, Path]) -> None:
    root = write_sample_project(tmp_path)
    summary = sample_compare()
    html = build_report(root, sample_evaluation(), figures, summary).read_text(encoding="utf-8")
    body = _section_body(html, "compare")
    assert "not run" not in body
    rows = re.findall(r"<tr( class=highlight)?>(.*?)</tr>", body)
    cells = [re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row) for _, row in rows]
    assert cells[0][:2] == ["K", "variant"]
    assert [c[:2] for c in cells[1:]] == [
        ["5", "rgb_only"],
        ["5", "full_method"],
        ["5", "no_rematch"],
        ["all", "rgb_only"],
        ["all", "full_method"],
    ]
    low, high = summary["by_k"]["5"]["full_method"]["diff_vs_rgb_only"]["ci95"]
    assert low > 0
    assert cells[2][2:] == ["0.725 ± 0.035", "2", f"+0.100 [{low:+.3f}, {high:+.3f}]", "✓"]
    assert cells[1][4] == "baseline" and cells[3][4] == "+0.000 [+0.000, +0.000]" and cells[3][5] == ""
    low_all = summary["by_k"]["all"]["full_method"]["diff_vs_rgb_only"]["ci95"][0]
    assert low_all > 0 and cells[5][5] == "✓"
    assert [bool(marked) for marked, _ in rows[1:]] == [False, True, False, False, True]  # those that beat it
    # the accuracy-vs-K figure sits in this section, once, and not again among the other figures
    assert body.count("data:image/png;base64,") == 1 and 'id="fig-accuracy_by_k"' in body
    assert 'id="fig-accuracy_by_k"' not in _section_body(html, "figures")


def test_comparison_without_its_figure_says_so(tmp_path: Path) -> None:
    root = write_sample_project(tmp_path)
    html = build_report(root, sample_evaluation(), {}, sample_compare()).read_text(encoding="utf-8")
    body = _section_body(html, "compare")
    assert "figure accuracy_by_k was not drawn" in body and "full_method" in body


def test_every_section_has_a_template_that_installs_with_the_package() -> None:
    import fnmatch
    import tomllib

    from ms2rgb.tasks.report.html import TEMPLATES

    assert all((TEMPLATES / f"{sid}.html.j2").is_file() for sid in SECTIONS)
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    patterns = package_data["ms2rgb.tasks.report"]
    files = [p.relative_to(TEMPLATES.parent).as_posix() for p in TEMPLATES.iterdir()]
    assert files and all(any(fnmatch.fnmatch(f, pattern) for pattern in patterns) for f in files), files
