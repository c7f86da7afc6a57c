"""Host memory: let glibc keep freed blocks for reuse instead of handing them back.

An eager PyTorch epoch on a CPU allocates every activation, gradient and update as a new
tensor (about a dozen 1 MiB blocks for the lecture's model) and frees it a moment later.
glibc hands blocks that large back to the kernel on free (munmap, or trimming the top of
the heap), so each one is zero-filled page by page on first touch again, every epoch, a
large share of torch's `eager` epoch on a small CPU (docs/performance.md, host memory).
Raising glibc's mmap and trim thresholds keeps freed memory in the heap, where the next
epoch finds it already mapped: what jemalloc or tcmalloc do when preloaded (PyTorch's CPU
performance guide), without a preload.

How far to raise them is a trade of memory for speed, so `HET_HOST_MALLOC` chooses:
- `keep` (default): blocks under 32 MiB come from the heap, and up to 64 MiB of freed heap
  is kept (glibc's own ceilings for its adaptive thresholds). The lecture's blocks are
  reused; a block of 32 MiB or more is mapped and handed back as glibc does by default, so
  no run holds more memory than under glibc's defaults beyond those 64 MiB. Such blocks
  are faulted in 2 MiB pages rather than 4 KiB ones: torch's THP_MEM_ALLOC_ENABLE (unless
  set already), where the kernel offers transparent huge pages: far fewer page faults.
- `large`: blocks under 1 GiB from the heap, up to 2 GiB of freed heap kept. Epochs with
  blocks of 32 MiB-1 GiB run faster, but the process holds up to twice the memory, more
  with rematerialisation (heap fragmentation). The figures: docs/performance.md.
- `system`: glibc as it is (to measure the difference).

The setting is process-wide, so only commands that own their process (the train command
and the benchmark) call `keep_freed_memory()`, before any framework starts; library users
can call it themselves. Outside glibc (macOS, Windows, musl) it does nothing.

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

from hetcore.errors import UsageError

ENV = "HET_HOST_MALLOC"
M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_MMAP_THRESHOLD = -3
# (mmap thresholds to try, first accepted wins; trim threshold) per mode. glibc before
# 2.35 refuses an mmap threshold over 32 MiB (HEAP_MAX_SIZE / 2).
MODES = {
    "keep": ((32 << 20,), 64 << 20),
    "large": ((1 << 30, 32 << 20), (1 << 31) - 1),
}
LEAN_THRESHOLD = 128 << 10  # glibc's initial mmap and trim thresholds

_applied: tuple[int, int] | None = None  # (mmap, trim) thresholds keep_freed_memory set


@functools.cache
def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _mallopt():
    """glibc's mallopt(param, value) -> 1 on success, or None outside glibc."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is not None:
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def _mib(n: int) -> str:
    return f"{n >> 30} GiB" if n >= 1 << 30 else f"{n >> 20} MiB"


@functools.cache
def keep_freed_memory() -> str:
    """Set glibc's mmap and trim thresholds once, as HET_HOST_MALLOC says; returns what
    the process uses, for the run's records."""
    mode = os.environ.get(ENV, "keep")
    if mode not in (*MODES, "system"):
        raise UsageError(f"{ENV}={mode}: use keep (the default), large or system")
    if mode == "system":
        return f"system malloc ({ENV}=system)"
    if not sys.platform.startswith("linux"):
        return f"system malloc ({sys.platform})"
    mallopt = _mallopt()
    if mallopt is None:
        return "system malloc (no glibc mallopt)"
    mmaps, trim_to = MODES[mode]
    mmap = next((t for t in mmaps if mallopt(M_MMAP_THRESHOLD, t)), None)
    trim = bool(mallopt(M_TRIM_THRESHOLD, trim_to))
    if mmap is None or not trim:
        return (f"system malloc (mallopt refused the {'mmap' if mmap is None else 'trim'} "
                "threshold)")
    global _applied
    _applied = (mmap, trim_to)
    huge = ""
    # torch reads the variable once, at its first CPU allocation: too late once imported.
    if (mode == "keep" and _huge_pages() and "torch" not in sys.modules
            and os.environ.setdefault(THP_ENV, "1") == "1"):
        huge = ", torch's large blocks on huge pages"
    return (f"glibc, freed blocks kept ({ENV}={mode}: mmap threshold {_mib(mmap)}, trim "
            f"threshold {_mib(trim_to + 1 if trim_to & 1 else trim_to)}{huge})")


THP_ENV = "THP_MEM_ALLOC_ENABLE"  # torch (c10): madvise(MADV_HUGEPAGE) on blocks >= 2 MiB


def _huge_pages() -> bool:
    """Whether the kernel gives transparent huge pages to memory that asks (madvise)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled", encoding="ascii") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def _set_thresholds(mmap: int, trim: int) -> None:
    mallopt = _mallopt()  # only called once keep_freed_memory has used it
    mallopt(M_MMAP_THRESHOLD, mmap)
    mallopt(M_TRIM_THRESHOLD, trim)


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

    Freed memory that glibc keeps is handed back first (malloc_trim), so that the block
    starts from what is live; the kernel's high-water mark (VmHWM) is then reset (`5` into
    /proc/self/clear_refs) and read at the end. It counts pages, not tensors: whatever
    the block touched, other threads of the process included. The reset also resets the
    peak that getrusage, wait4 and /usr/bin/time report for the whole process: time a
    process that uses this with something else.

    While keep_freed_memory's thresholds are in force, the block runs with glibc's initial
    ones instead (blocks of 128 KiB and more mapped and handed back on free), and they are
    put back after it: the peak is then what the block held live, not freed heap kept for
    reuse (up to 2 GiB with HET_HOST_MALLOC=large), which would blur a line through the
    peaks of several sizes."""

    def __init__(self):
        self.bytes: int | None = None
        self._start: int | None = None
        self._restore: tuple[int, int] | None = None

    def __enter__(self):
        if _applied is not None:
            _set_thresholds(LEAN_THRESHOLD, LEAN_THRESHOLD)
            self._restore = _applied
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
        if self._restore is not None:
            _set_thresholds(*self._restore)
        return False
