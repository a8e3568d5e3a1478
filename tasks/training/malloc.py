"""glibc's malloc thresholds for this process and the processes it starts (Linux only).

Why: torch allocates and frees the same large buffers on every training step (activations, and in
the backbone's pretraining the dense gradient of open_clip's 49408 x 128 token embedding, 25 MB,
twice a step). glibc's default hands such a buffer a fresh mmap until its adaptive threshold has
learnt the size, and trims the top of the heap back to the OS, so step after step touches new
pages: about a million minor page faults in the student stage on this project's 2-core machines,
and a fifth of a pretraining step spent zero-filling fresh pages. A fixed mmap threshold at glibc's
64-bit ceiling and a trim threshold well above a step's buffers keep them in the heap: the student
stage's faults fell from 0.95-1.4 M to 0.39-0.42 M and it ran 4 % faster (52.0 and 52.2 s against
49.9 and 50.4 s), the backbone's pretraining took 69 s instead of 80 s in `make run`; the numbers
are the same (where memory comes from never changes the arithmetic). The cost: up to TRIM_THRESHOLD
of freed heap stays with a process until it allocates again or exits (``tasks/training/memory.py``
trims it before measuring a peak).

Any fixed value turns glibc's adaptive mode off, so both are always set together: Dask's nanny
starts its workers with MALLOC_TRIM_THRESHOLD_=65536 alone, and a training step there ran about
2.5x slower until this reset it.
"""

from __future__ import annotations

import ctypes
import os
import sys

MMAP_THRESHOLD = 32 << 20  # glibc's ceiling on 64-bit: larger buffers are always mapped
TRIM_THRESHOLD = 256 << 20  # free heap kept before trimming; far above one step's buffers
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)


def steady_malloc() -> None:
    """Set both thresholds in this process (mallopt) and in the environment its child processes inherit."""
    if not sys.platform.startswith("linux"):
        return
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    os.environ["MALLOC_TRIM_THRESHOLD_"] = str(TRIM_THRESHOLD)
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl): its malloc reads neither
        return
    libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
