"""Whole-or-nothing writes: a file or folder appears complete under its name, or not at all.

Every DVC output (model files, pair tables, manifests, reports, the prepared folders) goes
through here, so a failed or killed run never leaves a half-written output behind.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` on a temp sibling of `path`, fsync it, then rename it over `path`.

    The temp file sits in the same folder (so the rename is atomic) under a hidden, unique
    name; `write` creates it, so it gets the usual permissions. On any failure the temp file
    is removed and an existing `path` is left as it was. Creates the parent folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def write_text_atomic(path: Path, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` whole or not at all."""
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding=encoding))


def write_json_atomic(path: Path, data: Any, default: Callable[[Any], Any] = str, indent: int = 2) -> Path:
    """`data` as indented JSON plus a final newline; `default` turns what JSON cannot hold into JSON.

    The text is built before anything is written, so data that cannot be encoded leaves no file.
    """
    return write_text_atomic(path, json.dumps(data, indent=indent, default=default) + "\n")


def swap_in_dir(tmp_dir: Path, final_dir: Path) -> Path:
    """Replace `final_dir` whole by the completed folder `tmp_dir` (a sibling of it).

    The old folder is only moved aside (to a sibling named after both) until the new one is in
    place, then deleted; if moving the new one in fails, the old one is put back.
    """
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    old = final_dir.with_name(f"{final_dir.name}.old-{tmp_dir.name.lstrip('.')}")
    shutil.rmtree(old, ignore_errors=True)  # left over by a run killed mid-swap
    moved = final_dir.exists()
    if moved:
        final_dir.rename(old)
    try:
        tmp_dir.rename(final_dir)
    except BaseException:
        if moved:
            old.rename(final_dir)
        raise
    if moved:
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(final_dir.parent)
    return final_dir
