"""Timing short device programs the same way in both frameworks (the benchmark's
references: the matmul peak and the matmul floor)."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def timed(fn: Callable, sync: Callable, repeats: int, target_s: float = 0.05) -> list[float]:
    """Seconds per call of `fn`, `repeats` samples after warm-up.

    Each sample is `inner` calls long (about `target_s` in all, at most 1000 calls): a
    program of microseconds is otherwise timed as much by the clock and the dispatch as by
    its work. `sync(outputs)` waits until the device has finished everything it was given
    (the framework's block_until_ready or synchronize).
    """
    sync([fn()])  # compiles, allocates
    t = time.perf_counter()
    sync([fn()])
    inner = int(min(1000, max(1, target_s / max(time.perf_counter() - t, 1e-7))))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        outs = [fn() for _ in range(inner)]
        sync(outs)
        times.append((time.perf_counter() - t) / inner)
    return times


def stats(values: list[float]) -> dict:
    """median, min, max and every value."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "all": list(values)}
