"""One writer per project: `ms2rgb run`, `ms2rgb stage` and `ms2rgb data` take this lock first.

The lock is an OS file lock (flock) on `<root>/.ms2rgb.lock`, so a killed holder releases it
at once and a stale lock cannot block anybody. The file also records who holds it (pid,
command, start time) so a second command can say whom it waits for. A command started by
the holder (`dvc repro` -> `ms2rgb stage`, inside `ms2rgb run`) inherits the lock through
the environment instead of deadlocking on it.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ms2rgb.tasks.errors import Ms2rgbError

LOCK_FILE = ".ms2rgb.lock"
HELD_ENV = "MS2RGB_LOCK_HELD"  # the project root whose lock this process tree holds


class ProjectBusy(Ms2rgbError):
    """Another ms2rgb command holds the project lock."""


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return "another ms2rgb command"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
    return f"pid {info.get('pid', '?')} (`{info.get('command', 'ms2rgb')}`, started {started})"


def _acquire(handle: int, path: Path, wait: float) -> None:
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise ProjectBusy(
                    f"{path.parent}: the project is busy: {_holder(path)} holds {path.name}. Fix: wait for it to "
                    "finish (or pass --wait SECONDS), or stop it; a killed holder frees the lock at once"
                ) from None
            time.sleep(0.5)


@contextmanager
def project_lock(root: Path, command: str, wait: float = 0.0) -> Iterator[None]:
    """Hold the project's lock for the body; wait up to `wait` seconds for another holder."""
    root = root.resolve()
    if os.environ.get(HELD_ENV) == str(root):
        yield  # our own parent process holds it
        return
    path = root / LOCK_FILE
    handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _acquire(handle, path, wait)
        os.ftruncate(handle, 0)
        os.write(handle, json.dumps({"pid": os.getpid(), "command": command, "started": time.time()}).encode())
        os.environ[HELD_ENV] = str(root)
        try:
            yield
        finally:
            os.environ.pop(HELD_ENV, None)
            os.ftruncate(handle, 0)
    finally:
        os.close(handle)  # closing the descriptor releases the flock
