"""Validation stamps: one small file per split that `validate` leaves when the data passed.

`validate` removes every stamp when it starts and writes `reports/validate/passed/<split>.json`
for every split when validation passed, so after a failed (or crashed) validation no stamp is
left. A stamp holds only stable content (the split, its tile counts and hashes over its tiles'
sha256 values; no timings, no paths), so its bytes change only when that split's tiles change.
The training stages depend in `dvc.yaml` on the stamps of exactly the splits they read: DVC orders
them after `validate`, and a new scene in `ms_pool` makes stale only the stages that read the pool.

Every training stage calls `require_validated` first: it refuses to train on a split without a
stamp, or on a prepared split whose tiles changed since its stamp was written.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from ms2rgb.tasks.data.atomic import write_text_atomic
from ms2rgb.tasks.data.cache import index_name
from ms2rgb.tasks.data.manifest import MODALITIES, SPLITS
from ms2rgb.tasks.errors import DataError

PASSED_DIR = Path("reports") / "validate" / "passed"
VALIDATE_REPORT = "reports/validate.json"
FIX = "run `ms2rgb stage validate` (or `dvc repro validate`) and fix what it reports"


def stamp_path(root: Path, split: str) -> Path:
    return root / PASSED_DIR / f"{split}.json"


def digest(sha256_values: Iterable[Any]) -> str:
    """sha256 over the sorted tile hashes, one per line: independent of row order."""
    h = hashlib.sha256()
    for value in sorted(str(v) for v in sha256_values):
        h.update(value.encode() + b"\n")
    return h.hexdigest()


def stamp_content(manifest: pd.DataFrame, split: str) -> dict[str, Any]:
    """What a split's stamp holds; computed from that split's manifest rows alone."""
    rows = manifest[manifest["split"] == split]
    by_modality = {m: rows[rows["modality"] == m]["sha256"] for m in MODALITIES}
    return {
        "split": split,
        "tiles": len(rows),
        "sha256": digest(rows["sha256"]),
        "modalities": {m: {"tiles": len(v), "sha256": digest(v)} for m, v in by_modality.items()},
    }


def clear_stamps(root: Path) -> None:
    """Remove every stamp (validation starts, or failed)."""
    folder = root / PASSED_DIR
    for path in folder.glob("*.json") if folder.is_dir() else ():
        path.unlink(missing_ok=True)


def write_stamps(root: Path, manifest: pd.DataFrame) -> list[Path]:
    """One stamp per split of SPLITS (an empty split gets one too), each written atomically."""
    clear_stamps(root)
    return [
        write_text_atomic(
            stamp_path(root, split), json.dumps(stamp_content(manifest, split), indent=2, sort_keys=True) + "\n"
        )
        for split in SPLITS
    ]


def require_validated(root: Path, prepared: Path, reads: Mapping[str, Iterable[str]]) -> str:
    """Raise DataError unless every split in `reads` ({split: modalities}) passed validation as it is now;
    return a digest of those splits' stamps, which names the data a training run used.

    Reads only the stamps and the indexes of the given splits and modalities (the files a stage
    declares in dvc.yaml). A split whose index is missing is left to open_split to report.
    """
    for split, modalities in reads.items():
        path = stamp_path(root, split)
        try:
            stamp = json.loads(path.read_text())
            recorded = {m: stamp["modalities"][m] for m in modalities}
        except (OSError, ValueError, KeyError, TypeError):
            raise DataError(
                VALIDATE_REPORT, f"split {split!r} has not passed validation (no valid stamp {path})", FIX
            ) from None
        for modality in modalities:
            index = prepared / index_name(split, modality)
            if not index.exists():
                continue
            hashes = pd.read_parquet(index, columns=["sha256"])["sha256"]
            if recorded[modality] != {"tiles": len(hashes), "sha256": digest(hashes)}:
                raise DataError(VALIDATE_REPORT, f"{index} changed since split {split!r} passed validation", FIX)
    return digest(stamp_path(root, split).read_text() for split in sorted(reads))
