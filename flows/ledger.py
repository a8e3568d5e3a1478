"""The watch's ledger: what landing content was seen, what became of it, and which scenes await a retrain.

`data/.landing/ledger.json` (rewritten atomically) holds three maps: `seen` (landing entry name ->
signature, settled polls, content hash), `scenes` (content sha256 -> status `ingested` | `duplicate` |
`quarantined` | `refused`, the names it arrived under, its scene id) and `refused` (unsafe names).
An ingested scene carries `retrain`: `pending` until a retrain takes it (`running`), then `trained`
or `failed` (flows/retrain.py). flows/landing.py writes the first two; flows/watch.py asks which
scenes to announce again.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ms2rgb.tasks.data.atomic import write_json_atomic

STATE_DIR = Path("data") / ".landing"  # ledger and staging copies of remote scenes, under the project
LEDGER_NAME = "ledger.json"
MAX_RETRAIN_ATTEMPTS = 3  # a scene whose retrain was killed this often is no longer re-announced
LOST_EVENT_S = 600.0  # a scene announced this long ago that no retrain has taken yet is announced again


def state_dir(root: Path) -> Path:
    return root / STATE_DIR


def load_ledger(root: Path) -> dict[str, Any]:
    path = state_dir(root) / LEDGER_NAME
    ledger: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    for key in ("seen", "scenes", "refused"):
        ledger.setdefault(key, {})
    return ledger


def save_ledger(root: Path, ledger: dict[str, Any]) -> None:
    write_json_atomic(state_dir(root) / LEDGER_NAME, ledger)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# ---------------------------------------------------------------- retrain bookkeeping


def _untrained(ledger: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in ledger["scenes"].values() if s["status"] == "ingested" and s["retrain"]["status"] != "trained"]


def awaiting_retrain(root: Path) -> list[str]:
    """What `watch` announces again when no retrain is queued: scenes a killed retrain left `running`,
    and scenes still `pending` LOST_EVENT_S after they were announced (the event went unheard), as
    long as MAX_RETRAIN_ATTEMPTS retrains have not been killed on them."""
    now = time.time()
    return [
        str(s["scene_id"])
        for s in _untrained(load_ledger(root))
        if s["retrain"]["attempts"] < MAX_RETRAIN_ATTEMPTS
        and (
            s["retrain"]["status"] == "running"
            or (s["retrain"]["status"] == "pending" and now - s.get("ingested_s", 0.0) > LOST_EVENT_S)
        )
    ]


def start_retrain(root: Path, run_id: str | None) -> list[str]:
    """Mark every ingested, untrained scene as taken by this retrain (DVC retrains on all of them)."""
    ledger = load_ledger(root)
    scenes = _untrained(ledger)
    for scene in scenes:
        scene["retrain"].update(status="running", run_id=run_id, started=now())
        scene["retrain"]["attempts"] += 1
    save_ledger(root, ledger)
    return [str(s["scene_id"]) for s in scenes]


def finish_retrain(root: Path, scene_ids: list[str], status: str, **info: Any) -> None:
    """Record how the retrain that took `scene_ids` ended (`trained` or `failed`, with details)."""
    ledger = load_ledger(root)
    for scene in ledger["scenes"].values():
        if scene.get("scene_id") in scene_ids and scene["status"] == "ingested":
            scene["retrain"].update(status=status, finished=now(), **info)
    save_ledger(root, ledger)
