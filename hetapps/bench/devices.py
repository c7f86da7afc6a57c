"""The data-parallel workload: the train command itself at 1, 2, 4, ... devices.

A data-parallel run is several devices (JAX) or processes (torch) and their collectives, so
it is timed as a user runs it: the whole train command, in a process of its own, at two
epoch counts; the difference over the extra epochs is the time an epoch takes, start-up,
process launch and compiling cancelled. On a CPU, JAX's devices are host devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=N`, set for the command) and torch's
processes share the cores (each takes cores / N threads), so more devices do not make an
epoch faster there: the figures say what the collectives cost. On GPUs each device is one
more chip.

The agreement check holds each run with N devices to the one-device run's losses as the
benchmark holds its loops to each other (hetapps.bench.report.agreement): the same law,
only the order of the sums differs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from hetcore.errors import UsageError

HOST_DEVICES = "--xla_force_host_platform_device_count"
METHOD = ("the train command's wall time at --epochs E and 2E (best of --repeats each), "
          "(t(2E) - t(E)) / E: start-up, process launch and compiling cancel")
RUN_TIMEOUT_S = 900  # one train command; a run past it is reported, not waited for


def argv_of(fields: dict) -> list[str]:
    """Train-command options for Settings fields given (hetapps.options' names)."""
    from hetapps.options import SETTINGS_OPTIONS, flag

    out = []
    for name, value in fields.items():
        if SETTINGS_OPTIONS[name].get("flag"):
            out += [flag(name)] if value else []
        else:
            out += [flag(name), str(value)]
    return out


def _env(framework: str, kind: str, devices: int) -> dict:
    env = dict(os.environ)
    if framework == "jax" and kind == "cpu":
        flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(HOST_DEVICES)]
        env["XLA_FLAGS"] = " ".join(flags + [f"{HOST_DEVICES}={devices}"])
    return env


class Refused(RuntimeError):
    """The train command refused the run before any work (exit 2): more devices than the
    machine has, say."""


def _train(argv: list[str], env: dict, out: str) -> tuple[float, dict]:
    """(wall seconds, metrics.json) of one train command."""
    cmd = [sys.executable, "-m", "hetapps.train", *argv, "--out", out, "--overwrite",
           "--no-progress"]
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True,
                              timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"did not finish in {RUN_TIMEOUT_S} s") from None
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        if done.returncode == 2:
            raise Refused(last.removeprefix("error: "))
        raise RuntimeError(f"exit {done.returncode}: {last}")
    with open(os.path.join(out, "metrics.json"), encoding="utf-8") as f:
        return wall, json.load(f)


def time_devices(fields: dict, frameworks, kind: str, counts: list[int],
                 epochs: int, repeats: int, log=print) -> tuple[list[dict], list[str]]:
    """(rows, skipped). Rows, one per framework and device count: ms an epoch by the
    difference of the train command's wall time at `epochs` and 2 x `epochs` (best of
    `repeats` each), the same from the runs' own training seconds, and the longer run's
    loss history. Skipped: the counts above one that the train command refused before any
    work (more devices than the machine has: torch runs one process a core on a CPU), each
    with its line."""
    if epochs < 1:
        raise UsageError(f"--epochs {epochs}: the data-parallel workload needs at least 1")
    rows, skipped = [], []
    with tempfile.TemporaryDirectory(prefix="bench-devices-") as scratch:
        for fw in frameworks:
            for n in counts:
                row = {"name": f"{fw}:devices={n}", "framework": fw, "loop": f"devices={n}",
                       "devices": n, "remat": False}
                walls, trains, history = {}, {}, None
                try:
                    for e in (epochs, 2 * epochs):
                        argv = argv_of({**fields, "framework": fw, "devices": n, "epochs": e})
                        for _ in range(repeats):
                            wall, metrics = _train(argv, _env(fw, kind, n),
                                                   os.path.join(scratch, f"{fw}-{n}-{e}"))
                            walls[e] = min(walls.get(e, wall), wall)
                            train_s = metrics["timing"]["train_s"]
                            trains[e] = min(trains.get(e, train_s), train_s)
                            history = metrics["loss_history"]
                except Refused as err:
                    if n > 1:
                        skipped.append(f"{row['name']}: {err}")
                        log(f"  {row['name']}: skipped ({err})")
                        continue
                    row["error"] = str(err)
                    rows.append(row)
                    continue
                except RuntimeError as err:
                    row["error"] = str(err)
                    log(f"  {row['name']}: failed ({err})")
                    rows.append(row)
                    continue
                ms = 1e3 * (walls[2 * epochs] - walls[epochs]) / epochs
                row.update(ms_per_epoch={"median": ms, "min": ms, "max": ms},
                           ms_per_epoch_train_s=1e3 * (trains[2 * epochs] - trains[epochs])
                           / epochs,
                           wall_s={str(k): v for k, v in walls.items()}, run_s=walls[epochs],
                           history=np.asarray(history, np.float64),
                           compile_s=metrics["timing"]["compile_s"],
                           final_loss=float(history[-1]))
                log(f"  {row['name']}: {ms:.3f} ms/epoch (train command at {epochs} and "
                    f"{2 * epochs} epochs: {walls[epochs]:.2f} s, {walls[2 * epochs]:.2f} s)")
                rows.append(row)
    return rows, skipped


def speedups(rows: list[dict]) -> dict:
    """Per framework and device count: the one-device epoch over this one's."""
    out = {}
    for r in rows:
        one = next((q for q in rows if q["framework"] == r["framework"] and q["devices"] == 1
                    and "ms_per_epoch" in q), None)
        if one is not None and "ms_per_epoch" in r:
            out.setdefault(r["framework"], {})[str(r["devices"])] = \
                one["ms_per_epoch"]["median"] / r["ms_per_epoch"]["median"]
    return out


def agreement(rows: list[dict], stable: bool) -> dict:
    """Each framework's runs on N devices against its own one-device run, by the
    benchmark's rule for loops (hetapps.bench.report.agreement)."""
    from hetapps.bench import report as rep

    parts = []
    for fw in dict.fromkeys(r["framework"] for r in rows):
        own = sorted((r for r in rows if r["framework"] == fw), key=lambda r: r["devices"])
        parts.append(rep.agreement(own, rep.CHECK_EPOCHS, None, stable=stable))
    return {"ok": all(p["ok"] for p in parts),
            "reference": ", ".join(p["reference"] or "none" for p in parts),
            "float32_epochs": parts[0]["float32_epochs"] if parts else 0,
            "float32_atol": parts[0].get("float32_atol") if parts else None,
            "float64_rtol": None, "float64": None,
            "failures": [f for p in parts for f in p["failures"]]}
