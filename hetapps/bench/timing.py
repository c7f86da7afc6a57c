"""The threads both frameworks get, and the timed repeats: every variant compiled or warmed
up once, then whole runs round-robin over the variants."""

from __future__ import annotations

import os
import statistics
import time

import numpy as np

from hetcore.errors import UsageError
from hetcore.interchange import cast
from hetcore.timing import stats

SETTLE_S = 0.5  # pause when switching frameworks, so that the other's threads go idle


def pin_threads(threads: int | None) -> int:
    """Pin this process to `threads` cores before any framework starts its pools.

    XLA's CPU client sizes its thread pool to the cores the process may run on
    (sched_getaffinity), and torch takes set_num_threads; pinning the affinity and setting
    torch to the same count gives both frameworks the same cores and the same count.
    Returns the count in use.
    """
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    if cores is None:
        return threads or (os.cpu_count() or 1)
    if threads:
        if threads > len(cores):
            raise UsageError(f"--threads {threads}: only {len(cores)} cores are available")
        os.sched_setaffinity(0, cores[:threads])
        return threads
    return len(cores)


class Settle:
    """Pauses SETTLE_S whenever the framework timed changes: torch's OpenMP threads spin
    for a while after each op and would steal the cores from XLA's pool (and the other way
    round)."""

    def __init__(self):
        self.last: str | None = None

    def __call__(self, framework: str) -> None:
        if self.last not in (None, framework):
            time.sleep(SETTLE_S)
        self.last = framework


def short(e: BaseException) -> str:
    """An exception as one short line."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def time_variants(variants, w, x, y, base, repeats, log, settle: Settle | None = None
                  ) -> list[dict]:
    """Compile each variant, then time `repeats` whole runs of each (the run `base`, a
    Settings, says), round-robin."""
    epochs = base.epochs
    settle = settle or Settle()
    rows, repeaters = [], []
    for v in variants:
        try:
            compile_s, repeat = v.trial(w, x, y, base)
        except UsageError:
            raise
        except Exception as e:  # noqa: BLE001 - a variant that cannot run is reported
            rows.append({"name": v.name, "framework": v.framework, "loop": v.loop,
                         "remat": v.remat, "error": short(e)})
            repeaters.append(None)
            log(f"  {v.name}: failed: {short(e)}")
            continue
        rows.append({"name": v.name, "framework": v.framework, "loop": v.loop, "remat": v.remat,
                     "compile_s": compile_s, "seconds": []})
        repeaters.append(repeat)
        log(f"  {v.name}: compiled/warmed up in {compile_s:.2f} s")
    # Round-robin over every variant, so that the machine's drift (up to 15% within a run on
    # a shared machine) falls on both frameworks alike, with a pause at each change.
    for r in range(repeats):
        for fw in dict.fromkeys(row["framework"] for row in rows):
            settle(fw)
            for row, repeat in zip(rows, repeaters):
                if repeat is None or row["framework"] != fw:
                    continue
                seconds, history, final = repeat()
                row["seconds"].append(seconds)
                if r == 0:
                    row["history"], row["final_loss"] = history, final
            log(f"  {fw} repeat {r + 1}/{repeats}: " + ", ".join(
                f"{row['name']} {1e3 * row['seconds'][-1] / epochs:.3f}"
                for row in rows if row["framework"] == fw and row.get("seconds")) + " ms/epoch")
    for row in rows:
        if "seconds" in row:
            per = [s / epochs for s in row["seconds"]]
            row["ms_per_epoch"] = {k: (1e3 * v if k != "all" else [1e3 * t for t in v])
                                   for k, v in stats(per).items()}
            row["run_s"] = row["compile_s"] + statistics.median(row["seconds"])
    return rows


def float64_finals(variants, w, x, y, base, log) -> dict:
    """Each variant's (final loss, loss history) when it trains the same run in float64."""
    w64 = cast(w, "float64")
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    out = {}
    for v in variants:
        try:
            _, repeat = v.trial(w64, x64, y64, base.replace(dtype="float64"))
            first = repeat.first if hasattr(repeat, "first") else repeat()
            out[v.name] = (first[2], np.asarray(first[1], np.float64))
        except Exception as e:  # noqa: BLE001 - reported as a failed check
            log(f"  {v.name}: float64 check failed to run: {short(e)}")
    return out
