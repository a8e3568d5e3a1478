"""The Prefect `retrain` flow: what new scenes make stale, run again, promoted only if better.

`retrain` adds no stage logic: it runs the `pipeline` flow (flows/pipeline.py) as a subflow, which
asks DVC before each stage and runs only the stale ones. Scenes ingested into `data/scenes/` (by
`watch`) make stale exactly `prepare` (the scenes join the prepared MS pool), `validate`, `pairs`
(teacher pseudo-labels and pairs), `student` and `evaluate`, which scores the new versions and moves
`champion` only for a real gain; teacher, matcher and detector stay fresh and are skipped.

Around that run, under the project lock (one writer per project, so `watch` cannot ingest mid-run):
- the ledger (flows/ledger.py) records which scenes this retrain took and whether it finished
  with them; a retrain killed midway leaves them untrained, and since DVC still finds the stages
  stale the next retrain takes them again. Evaluation moves aliases last, so a kill leaves every
  champion where it was;
- each stage that ran is recorded in dvc.lock (the pipeline's `dvc_state.record`); afterwards the
  data version (the `data/prepared` hash in dvc.lock) is pushed to the configured DVC remote, and
  every MLflow run this retrain made gets the tags `ms2rgb.data_version`, `ms2rgb.scenes` and
  `ms2rgb.retrain` (this flow run's id). Which runs those are is told by their `ms2rgb.flow_run_id`
  tag, this flow run's id (the pipeline subflow stamps it), not by when they started: runs of other
  flow runs, projects or people on a shared tracking server stay as they were.
The deployment `retrain/on-new-scenes` (flows/serve.py) allows one run at a time; others queue.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger

from ms2rgb.flows import ledger
from ms2rgb.flows.lock import project_lock
from ms2rgb.flows.pipeline import current_flow_run_id, pipeline
from ms2rgb.tasks import tracking
from ms2rgb.tasks.config import load_params

PREPARED = "data/prepared"  # the prepare stage's output that every training stage reads
# The comparison of baselines answers a research question, not a production one: new scenes leave it stale
# until the next `make run` / `dvc repro`, and a retrain stays a few minutes.
RETRAIN_SKIPS = ("compare",)


def data_versions(root: Path) -> dict[str, str]:
    """The DVC hashes of the data as dvc.lock records it: `data/prepared` (an output of `prepare`,
    what `dvc pull` restores) and `data/scenes` (its dependency); empty before prepare ever ran."""
    lock = root / "dvc.lock"
    if not lock.exists():
        return {}
    prepare = ((yaml.safe_load(lock.read_text()) or {}).get("stages") or {}).get("prepare") or {}
    hashes = {e["path"]: str(e.get("md5", "")) for e in prepare.get("outs", []) + prepare.get("deps", [])}
    return {k: hashes[k] for k in (PREPARED, "data/scenes") if k in hashes}


def push(root: Path) -> str:
    """`dvc push` to the configured default remote; a sentence saying what happened."""
    from dvc.repo import Repo

    with contextlib.chdir(root), Repo(".") as repo:
        remote = repo.config["core"].get("remote")
        if not remote:
            return "no default DVC remote configured (core.remote): nothing pushed"
        try:
            count = repo.push()
        except Exception as exc:  # a push failure must not hide that the models were trained and judged
            return f"dvc push to {remote!r} failed: {type(exc).__name__}: {exc}"
    return f"dvc push to {remote!r}: {count} file(s) transferred"


@flow(name="retrain", log_prints=True)
def retrain(root: str = ".", scene_ids: list[str] | None = None, wait: float = 3600.0) -> dict[str, Any]:
    """Run the stages DVC finds stale (new scenes: prepare, validate, pairs, student, evaluate), record
    the data version in dvc.lock, push it, and tag the MLflow runs with it."""
    logger = get_run_logger()
    path = Path(root).resolve()
    params = load_params(path)  # every section checked before anything starts
    run_id = current_flow_run_id()
    with project_lock(path, f"retrain {run_id or ''}".strip(), wait):
        taken = ledger.start_retrain(path, run_id)
        logger.info("retrain: announced %s; untrained scenes in the pool: %s", scene_ids or [], taken)
        try:
            reports = pipeline(root=str(path), skip=RETRAIN_SKIPS, flow_run_id=run_id)
        except Exception as exc:  # a kill never gets here: then the scenes stay `running` and are retried
            ledger.finish_retrain(path, taken, "failed", reason=f"{type(exc).__name__}: {exc}"[:4000])
            raise
        ran = [name for name, report in reports.items() if report is not None]
        versions = data_versions(path)
        version = versions.get(PREPARED, "")
        pushed = push(path) if ran else "nothing ran: nothing to push"
        tagged = 0
        if ran and run_id:
            tags = {
                "ms2rgb.data_version": version,
                "ms2rgb.data_version.scenes": versions.get("data/scenes", ""),
                "ms2rgb.scenes": ",".join(taken or scene_ids or [])[:5000],
                "ms2rgb.retrain": run_id,
            }
            tagged = tracking.tag_flow_run(path, params.tracking.experiment, run_id, tags)
        ledger.finish_retrain(path, taken, "trained", data_version=version, run_id=run_id)
    evaluation = reports.get("evaluate") or {}
    promotion = {name: d.get("decision") for name, d in (evaluation.get("promotion") or {}).items()}
    logger.info("retrain: ran %s; data version %s; %s; tagged %d MLflow run(s)", ran, version, pushed, tagged)
    if promotion:
        logger.info("retrain: promotion decisions %s", promotion)
    return {
        "ran": ran,
        "scenes": taken,
        "data_version": version,
        "pushed": pushed,
        "tagged_runs": tagged,
        "promotion": promotion,
    }
