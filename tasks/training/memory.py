"""Peak memory of one block of work (a training run), measured the same way for every method.

- CUDA: ``torch.cuda.max_memory_allocated`` over the block minus the allocation on entry: the
  tensors the method itself adds (weights, activations, optimiser state), not the caching
  allocator's reserve.
- CPU (Linux): the process's peak resident set over the block (``VmHWM``, reset on entry by
  writing 5 to ``/proc/self/clear_refs``) minus the resident set on entry. This sees every
  allocation, numpy's, torch's and scikit-learn's C arrays alike (``tracemalloc`` misses the last
  two), at page granularity. Freed memory that the C allocator still holds would be reused
  unseen, so on entry garbage is collected and glibc's ``malloc_trim`` hands free heap pages back
  first; without glibc a second run may read lower than the first. The first torch training of a
  process also counts torch's one-time kernel caches (oneDNN: about 60 MB for the U-Net on 2
  cores). Read it as "what this block added at its peak", not as the process's total.
- Elsewhere (no resettable peak): ``None``, never a number that means something else.

``ru_maxrss`` is not used: it is the peak since the process started and cannot be reset.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from pathlib import Path
from types import TracebackType

import torch

_STATUS, _CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def _release_free_heap() -> None:
    """Collect garbage and return the C heap's free pages to the OS (glibc; a no-op elsewhere)."""
    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc: nothing to trim
        pass


def _status_kb(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM), or None without procfs."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_rss_peak() -> bool:
    """Make VmHWM equal the current resident set (Linux >= 4.0); False where that is not possible."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


class PeakMemory:
    """``with PeakMemory(device) as mem: ...``, then ``mem.mb``: the block's peak in MB (or None)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mb: float | None = None
        self._start = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        _release_free_heap()
        if _reset_rss_peak():
            self._start = _status_kb("VmRSS") or -1
        else:
            self._start = -1
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mb = (torch.cuda.max_memory_allocated(self.device) - self._start) / 2**20
            return
        peak = _status_kb("VmHWM")
        if self._start >= 0 and peak is not None:
            self.mb = max(peak - self._start, 0) / 1024
