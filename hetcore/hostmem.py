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

@functools.cache
def keep_freed_memory() -> str:
    """Raise glibc's mmap and trim thresholds once; returns what the process uses, for
    the run's records."""
    if os.environ.get(ENV, "keep") == "system":
        return f"system malloc ({ENV}=system)"
    if not sys.platform.startswith("linux"):
        return f"system malloc ({sys.platform})"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "system malloc (no glibc mallopt)"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mmap = next((t for t in MMAP_THRESHOLDS if mallopt(M_MMAP_THRESHOLD, t)), None)
    trim = bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if mmap is None or not trim:
        return (f"system malloc (mallopt refused the {'mmap' if mmap is None else 'trim'} "
                "threshold)")
    return (f"glibc, freed blocks kept (mmap threshold {mmap >> 20} MiB, trim threshold "
            "2 GiB)")
