"""Host memory: let glibc keep freed blocks for reuse instead of handing them back.

An eager PyTorch epoch on a CPU allocates every activation, gradient and update as a new
tensor (about a dozen 1 MiB blocks for the lecture's model) and frees it a moment later.
glibc hands blocks that large back to the kernel on free (munmap, or trimming the top of
the heap), so each one is zero-filled page by page on first touch again, every epoch: on this project's 2-core VM that
cost ~40% of torch's `eager` epoch (about 7.4-8.9 ms against 4.6-5.2 ms with the freed
blocks kept; README, Performance). Raising glibc's mmap and trim thresholds keeps freed
memory in the heap, where the next epoch finds it already mapped: what jemalloc or
tcmalloc do when preloaded (PyTorch's CPU performance guide), without a preload.

The setting is process-wide, so only commands that own their process (the train command
and the benchmark) call `keep_freed_memory()`, before any framework starts; library users
can call it themselves. `HET_HOST_MALLOC=system` leaves the C library as it is (to
measure the difference). Outside glibc (macOS, Windows, musl) it does nothing.

`ResidentPeak` measures what a block of code adds to the process's resident memory at
its peak (Linux): the benchmark's CPU peak memory for torch, which keeps no statistics of
its CPU allocations.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

ENV = "HET_HOST_MALLOC"
M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_MMAP_THRESHOLD = -3
# Blocks below the mmap threshold come from the heap and are reused. glibc before 2.35
# refuses more than 32 MiB (HEAP_MAX_SIZE / 2); the lecture's blocks are 1 MiB.
MMAP_THRESHOLDS = (1 << 30, 32 << 20)
TRIM_THRESHOLD = (1 << 31) - 1  # keep up to ~2 GiB of freed heap before returning it


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


@functools.cache
def keep_freed_memory() -> str:
    """Raise glibc's mmap and trim thresholds once; returns what the process uses, for
    the run's records."""
    if os.environ.get(ENV, "keep") == "system":
        return f"system malloc ({ENV}=system)"
    if not sys.platform.startswith("linux"):
        return f"system malloc ({sys.platform})"
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return "system malloc (no glibc mallopt)"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mmap = next((t for t in MMAP_THRESHOLDS if mallopt(M_MMAP_THRESHOLD, t)), None)
    trim = bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if mmap is None or not trim:
        return (f"system malloc (mallopt refused the {'mmap' if mmap is None else 'trim'} "
                "threshold)")
    return (f"glibc, freed blocks kept (mmap threshold {mmap >> 20} MiB, trim threshold "
            "2 GiB)")


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


class ResidentPeak:
    """`with ResidentPeak() as m: ...`, then `m.bytes`: the peak of the process's resident
    memory during the block above what it was at the start, or None where the kernel does
    not offer it (not Linux, or Linux < 4.0).

    Freed memory that glibc keeps (see above) is handed back first (malloc_trim), so that
    the block starts from what is live; the kernel's high-water mark (VmHWM) is then reset
    (`5` into /proc/self/clear_refs) and read at the end. It counts every page the block
    touched: allocator overhead and fragmentation included, the same as a user's process
    pays, not only tensor bytes. Other threads of the process count too."""

    def __init__(self):
        self.bytes: int | None = None
        self._start: int | None = None

    def __enter__(self):
        trim = getattr(_libc(), "malloc_trim", None)
        if trim is not None:
            trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
            trim(0)
        try:
            start = _status_kib("VmRSS")
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")
            if _status_kib("VmHWM") <= start + 1024:  # the reset took (1 MiB of slack)
                self._start = start
        except OSError:
            self._start = None
        return self

    def __exit__(self, *exc):
        if self._start is not None and exc[0] is None:
            try:
                self.bytes = max(0, _status_kib("VmHWM") - self._start) * 1024
            except OSError:
                self.bytes = None
        return False
