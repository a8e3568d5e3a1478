"""evaluate stage: every registered model on held-out data, champion/challenger promotion, the report.

Each training stage registered a new version with the alias `challenger` (its report names the
version). Here each challenger (its stage's artifacts) and the current `champion` of the same
registered model are scored on the same held-out tiles (`tasks/evaluation/scoring.py`); the
champion moves only when the paired 95 % interval of the headline gain lies above promote.min_gain
and nothing else regresses (`tasks/evaluation/promotion.py`, `tasks/evaluation/evidence.py`).
Aliases and version tags change last, after every score, figure and the report are written,
so a failed or killed evaluation leaves every champion where it was.
Outputs: reports/evaluate.json (DVC metrics), reports/evaluate/*.png, reports/index.html.
The report shows the compare stage's summary (reports/compare.json) when it exists: a retrain after
new scenes skips compare, so its last comparison is shown as it was.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ms2rgb.tasks import tracking
from ms2rgb.tasks.config import ModelKind, Params, model_name
from ms2rgb.tasks.data.artifacts import model_path
from ms2rgb.tasks.data.atomic import write_text_atomic
from ms2rgb.tasks.data.cache import open_split
from ms2rgb.tasks.data.pairing import load_true_pairs
from ms2rgb.tasks.data.validated import require_validated
from ms2rgb.tasks.detection.data import load_tiles
from ms2rgb.tasks.detection.index_maps import index_tiles
from ms2rgb.tasks.detection.model import load_local
from ms2rgb.tasks.errors import Ms2rgbError
from ms2rgb.tasks.evaluation.promotion import Decision, weigh
from ms2rgb.tasks.evaluation.scoring import Scored, TestData, headline, score_classifier, score_detector, score_matcher
from ms2rgb.tasks.tracking import StageTracker
from ms2rgb.tasks.tracking.lineage import latest_stage_runs
from ms2rgb.tasks.training.store import load_model

READS = {"test": ("ms", "rgb"), "pair_test": ("ms", "rgb"), "seg_test": ("rgb",)}
# The stages whose registered model (model_name(tracking.model_prefix, stage)) is judged here.
MODELS: tuple[ModelKind, ...] = ("teacher", "matcher", "student", "detector")
FIGURES_DIR = Path("reports") / "evaluate"
COMPARE_REPORT = Path("reports") / "compare.json"


def load_test_data(prepared: Path) -> TestData:
    seg_images, seg_masks = load_tiles(open_split(prepared, "seg_test", "rgb", masks=True))
    return TestData(
        open_split(prepared, "test", "ms"),
        open_split(prepared, "test", "rgb"),
        load_true_pairs(prepared, "pair_test"),
        seg_images,
        seg_masks,
    )


def score(stage: str, model: Any, data: TestData, params: Params) -> Scored:
    """The figures and per-tile outcomes of one model of `stage`'s kind on its held-out set."""
    cfg = params.evaluation
    if stage == "teacher":
        return score_classifier(model, data.ms_test, cfg, params.seed)
    if stage == "student":
        return score_classifier(model, data.rgb_test, cfg, params.seed)
    if stage == "matcher":
        return score_matcher(model, data.pairs)
    return score_detector(model, data, cfg)


def load_challenger(root: Path, stage: str) -> Any:
    """What the stage just trained, from its artifacts (the same weights as its registered version)."""
    if stage == "detector":
        return load_local(root)
    return load_model(model_path(root, stage), "matcher" if stage == "matcher" else "scene_cnn", stage)


def challenger_version(root: Path, stage: str) -> int:
    report = json.loads((root / "reports" / f"{stage}.json").read_text())
    return int(report.get("model_version") or str(report.get("registered_model", "/0")).rsplit("/", 1)[-1])


def judge(
    root: Path,
    stage: ModelKind,
    new: Scored,
    data: TestData,
    params: Params,
    force: bool = False,
    version: int | None = None,
) -> Decision:
    """Compare a challenger with the champion, re-scored on the same tiles (paired, seeded)."""
    name = model_name(params.tracking.model_prefix, stage)
    version = challenger_version(root, stage) if version is None else version
    champion = tracking.version_by_alias(root, name, "champion")
    old = None
    if champion is not None and champion != version and not force:
        old = score(stage, tracking.load_registered_module(root, f"models:/{name}/{champion}"), data, params)
    samples, seed = params.evaluation.bootstrap, params.seed
    return weigh(stage, version, new, champion, old, params.promote, samples, seed, force)


def apply(root: Path, name: str, decision: Decision) -> None:
    """Point `champion` at the decided version and record the decision on both versions' tags."""
    tags = {
        "ms2rgb.decision": decision.decision,
        "ms2rgb.reasons": "; ".join(decision.reasons)[:5000],
        "ms2rgb.metrics": json.dumps(decision.metrics["challenger"]),
    }
    tracking.tag_version(root, name, decision.challenger, tags)
    tracking.set_alias(root, name, "champion", decision.champion)


def follow_backbone(root: Path, params: Params) -> None:
    """The fallback CLIP backbone the detector was tuned on becomes champion with that detector.

    Which version that is comes from the detector's report ("fallback:ms2rgb-clip-backbone v5 (...)"),
    not from the backbone's `challenger` alias: a detector run resumed after a kill reuses the killed
    run's backbone without registering it again, and a detector on named CLIP weights has none.
    """
    backbone = model_name(params.tracking.model_prefix, "clip-backbone")
    weights = str(json.loads((root / "reports" / "detector.json").read_text()).get("weights", ""))
    found = re.search(rf"fallback:{re.escape(backbone)} v(\d+)", weights)
    if found is None:
        return
    version = int(found.group(1))
    if not tracking.version_exists(root, backbone, version):
        print(
            f"evaluate: {backbone} v{version} (the detector's fallback backbone) is not in the registry, "
            "so its champion stays; re-run the detector stage to register it",
            flush=True,
        )
        return
    tracking.set_alias(root, backbone, "champion", version)


def lineage(root: Path, params: Params) -> dict[str, Any]:
    """Where this evaluation's numbers come from: code, data, params, runs, CLIP weights."""
    try:
        commit: str | None = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    lock = root / "dvc.lock"
    data: dict[str, str] = {}
    if lock.exists():
        for stage in (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).values():
            data.update({o["path"]: o.get("md5", "") for o in stage.get("outs", [])})
    detector = root / "reports" / "detector.json"
    weights = json.loads(detector.read_text()).get("weights") if detector.exists() else None
    return {
        "git_commit": commit,
        "dvc_data": data,
        "params": params.model_dump(by_alias=True),
        "mlflow_run_ids": latest_stage_runs(root, params.tracking.experiment),
        "clip_weights": str(weights),
    }


def summary(root: Path, scores: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The evaluation dict (reports/evaluate.json) from the scores and the training reports."""
    student = json.loads((root / "reports" / "student.json").read_text())
    rgb_only = rgb_only_at(read_compare(root), student.get("rgb_labels_per_class"))
    detector = json.loads((root / "reports" / "detector.json").read_text())
    by_k = {str(k): v.get("miou") if isinstance(v, dict) else v for k, v in detector.get("by_shots", {}).items()}
    out: dict[str, Any] = {stage: {"version": challenger_version(root, stage), **scores[stage]} for stage in MODELS}
    out["detector"]["miou_by_k"] = by_k
    if rgb_only:
        out["rgb_only"] = {"accuracy": rgb_only.get("mean"), "std": rgb_only.get("std"), "k": rgb_only["k"]}
    return out


def rgb_only_at(compare: dict[str, Any] | None, k: int | None) -> dict[str, Any]:
    """The compare stage's rgb_only at the production student's label budget, or {} when not compared."""
    key = "all" if k is None else str(k)
    found = ((compare or {}).get("by_k") or {}).get(key, {}).get("rgb_only")
    return {**found, "k": key} if found else {}


def run(root: Path, params: Params, tracker: StageTracker) -> dict[str, Any]:
    """Stage entry point (DVC and Prefect call this alike)."""
    start = time.perf_counter()
    prepared = root / params.data.prepared_dir
    require_validated(root, prepared, READS)
    data = load_test_data(prepared)
    models = {stage: load_challenger(root, stage) for stage in MODELS}
    scored = {stage: score(stage, models[stage], data, params) for stage in MODELS}
    names = {stage: model_name(params.tracking.model_prefix, stage) for stage in MODELS}
    decisions = {names[stage]: judge(root, stage, scored[stage], data, params) for stage in MODELS}
    scores: dict[str, dict[str, Any]] = {stage: scored[stage].figures for stage in MODELS}
    preds = scored["detector"].maps
    assert preds is not None, "score_detector keeps the predicted maps"
    evaluation = summary(root, scores)
    evaluation["promotion"] = {name: d.as_dict() for name, d in decisions.items()}
    evaluation["lineage"] = lineage(root, params)
    n = params.evaluation.overlays
    overlays = (data.seg_images[:n].numpy(), preds[:n], data.seg_masks[:n].numpy(), models["detector"].class_names)
    overlay_indices = index_tiles(root, prepared, "seg_test", range(len(overlays[0])))  # None: no such figure
    tracker.log_metrics({f"{stage}.{k}": v for stage in MODELS for k, v in headline(stage, scores[stage]).items()})
    evaluation["seconds"] = round(time.perf_counter() - start, 2)
    report_page(root, evaluation, overlays, tracker, overlay_indices)
    for name, decision in decisions.items():  # last: a champion only ever points at an evaluated version
        apply(root, name, decision)
        if name == names["detector"] and decision.champion == decision.challenger:
            follow_backbone(root, params)
        print(
            f"evaluate: {name}: {decision.decision} (champion v{decision.champion}, challenger "
            f"v{decision.challenger}): {'; '.join(decision.reasons)}",
            flush=True,
        )
    return evaluation


def write_plot_data(evaluation: dict[str, Any], out: Path) -> None:
    """The CSVs behind `dvc plots show` (dvc.yaml top-level plots)."""
    out.mkdir(parents=True, exist_ok=True)
    rel = evaluation["student"]["reliability"]
    rows = [f"{c},{a},{n}" for c, a, n in zip(rel["confidence"], rel["accuracy"], rel["count"]) if c is not None]
    write_text_atomic(out / "reliability.csv", "confidence,accuracy,tiles\n" + "\n".join(rows) + "\n")
    by_k = sorted((int(k), v) for k, v in evaluation["detector"]["miou_by_k"].items() if v is not None)
    write_text_atomic(out / "miou_by_k.csv", "shots,miou\n" + "".join(f"{k},{v}\n" for k, v in by_k))


def promote_by_hand(root: Path, params: Params, name: str, version: int, force: bool) -> Decision:
    """`ms2rgb promote NAME VERSION`: the evaluate stage's check for one version; --force overrides it."""
    stages = {model_name(params.tracking.model_prefix, stage): stage for stage in MODELS}
    if name not in stages:
        raise Ms2rgbError(
            f"promote: {name!r} is not a registered model of this project; valid names are {sorted(stages)} "
            "(<tracking.model_prefix>-<stage>, params.yaml)"
        )
    stage = stages[name]
    module = tracking.load_registered_module(root, f"models:/{name}/{version}")
    data = load_test_data(root / params.data.prepared_dir)
    decision = judge(root, stage, score(stage, module, data, params), data, params, force=force, version=version)
    apply(root, name, decision)
    return decision


def read_compare(root: Path) -> dict[str, Any] | None:
    """The compare stage's summary, or None when it has not run."""
    path = root / COMPARE_REPORT
    return json.loads(path.read_text()) if path.exists() else None


def report_page(
    root: Path,
    evaluation: dict[str, Any],
    overlays: tuple[Any, ...],
    tracker: StageTracker,
    overlay_indices: np.ndarray | None = None,
) -> Path:
    """Figures and the self-contained HTML page, logged to MLflow too; `overlay_indices`: the overlay
    tiles' NDWI/NDVI/NDBI maps (scene tiles, `index_tiles`), which add the index-maps figure."""
    from ms2rgb.tasks.report.figures import write_figures
    from ms2rgb.tasks.report.html import build_report

    compare = read_compare(root)
    write_plot_data(evaluation, root / FIGURES_DIR)
    figures = write_figures(evaluation, root / FIGURES_DIR, overlays, compare, overlay_indices)
    page = build_report(root, evaluation, figures, compare)
    for path in figures.values():
        tracker.log_artifact(path, "evaluate")
    tracker.log_artifact(page)
    print(f"evaluate: report {page}", flush=True)
    return page
