"""Run directories: checked before any work, written whole or not at all.

Every file of a run is first written into a staging directory beside `--out` and moved into
place only when all of them are complete, so `--out` never holds a half-written file and a
failed or interrupted run leaves it as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager

import numpy as np

from hetcore.errors import UsageError

RUN_FILES = ("metrics.json", "predictions.csv", "test_predictions.csv",
             "initial_weights.safetensors", "weights.safetensors", "fit.png", "fit.svg",
             "loss.png", "loss.svg", "calibration.png", "calibration.svg")
ENSEMBLE_FILES = ("extrapolation.png", "extrapolation.svg")  # an ensemble's run adds them
BOTH_FILES = ("parity.json", "parity.png", "parity.svg", "jax", "torch")
# the loss comparison's (hetapps.compare): its three runs and their figure
COMPARE_FILES = ("compare.json", "losses.png", "losses.svg", "mse", "nll", "beta-nll")
CHECKPOINTS = ("checkpoint-jax.safetensors", "checkpoint-torch.safetensors")
# What a finished run of any command may leave in --out: replacing a run (--overwrite)
# removes those of them the new run does not write, so that the directory holds one run.
# Anything else there is the user's and stays.
OUTPUTS = RUN_FILES + ENSEMBLE_FILES + BOTH_FILES + COMPARE_FILES


def default_out(framework: str, root: str = "runs") -> str:
    """A new directory under runs/ named by time and framework."""
    stem = os.path.join(root, time.strftime("%Y%m%d-%H%M%S") + f"-{framework}")
    path, k = stem, 1
    while os.path.exists(path):
        k += 1
        path = f"{stem}-{k}"
    return path


def check_out(out: str, overwrite: bool, inputs: tuple = ()) -> None:
    """Refuse an --out that is a file, that holds a run (unless overwrite), or that cannot
    be created; and, with overwrite, one whose run's files include an input of this run
    (`inputs`, paths): replacing the run would delete it."""
    if not out.strip():  # (not the default: leaving --out out gives one under runs/)
        raise UsageError("--out: empty; name a directory, or leave --out out for one under "
                         "runs/")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out}: exists and is not a directory")
    if os.path.isdir(out) and not overwrite:
        # any name a run writes: without --overwrite nothing there is replaced or removed
        held = [n for n in OUTPUTS if os.path.lexists(os.path.join(out, n))]
        if held:
            raise UsageError(
                f"--out {out}: already holds a run ({held[0]}); pass --overwrite to replace it"
            )
        unfinished = [n for n in CHECKPOINTS if os.path.exists(os.path.join(out, n))]
        if unfinished:
            raise UsageError(
                f"--out {out}: holds an unfinished run ({unfinished[0]}); continue it with "
                f"--resume {out}, or pass --overwrite to replace it"
            )
    parent = os.path.dirname(os.path.abspath(out))
    existing = parent
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: cannot create it under {existing} (not writable)")
    # Permission bits do not tell (root passes os.access under /proc or a read-only
    # mount): create and remove a directory where the run's staging directory will go
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".probe-", dir=existing))
    except OSError as e:
        raise UsageError(f"--out {out}: cannot create it under {existing} "
                         f"({e.strerror or e})") from None
    if overwrite and os.path.isdir(out):
        ours = {os.path.realpath(os.path.join(out, n)) for n in OUTPUTS}
        for path in inputs:
            real = os.path.realpath(path) if path else None
            if real is not None and any(real == o or real.startswith(o + os.sep)
                                        for o in ours):
                raise UsageError(f"--out {out}: --overwrite would delete {path}, an input "
                                 "of this run; choose another --out")


def _remove_stale(src: str, dst: str) -> None:
    """Remove from dst the outputs of an earlier run (OUTPUTS) that src does not bring."""
    for name in OUTPUTS:
        path = os.path.join(dst, name)
        if os.path.lexists(path) and not os.path.lexists(os.path.join(src, name)):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)


def _move_into(src: str, dst: str) -> None:
    """Move every file under src to the same place under dst, replacing files there."""
    os.makedirs(dst, exist_ok=True)
    for name in sorted(os.listdir(src)):
        s, d = os.path.join(src, name), os.path.join(dst, name)
        if os.path.isdir(s):
            if os.path.isdir(d):  # a run's own subdirectory (jax/, torch/, ...)
                _remove_stale(s, d)
            _move_into(s, d)
        else:
            os.replace(s, d)


def _normal_modes(root: str) -> None:
    """mkdtemp and safetensors create owner-only entries; give them the umask's modes."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(root, 0o777 & ~mask)
    for top, dirs, files in os.walk(root):
        for d in dirs:
            os.chmod(os.path.join(top, d), 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(top, f), 0o666 & ~mask)


@contextmanager
def staged(out: str):
    """Yield a staging directory; on success its contents land in `out`, else vanish."""
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    stage = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.staging-",
                             dir=parent)
    _STAGING.add(stage)
    try:
        yield stage
        _normal_modes(stage)
        with _sigterm_deferred():  # a stop arriving now waits until the run is in place
            if not os.path.exists(out):
                os.rename(stage, out)  # one atomic step
            else:  # a run replaced (--overwrite) or a directory without one
                _remove_stale(stage, out)
                _move_into(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        _STAGING.discard(stage)


_STAGING: set[str] = set()  # the staging directories being written in this process


@contextmanager
def _sigterm_deferred():
    """SIGTERM held back while the block runs (the main thread of a POSIX process; elsewhere
    nothing is held): moving a finished run into --out is not cut half way."""
    import signal
    import threading

    hold = hasattr(signal, "pthread_sigmask") and \
        threading.current_thread() is threading.main_thread()
    if hold:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        if hold:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def discard_staging() -> None:
    """Remove every staging directory this process is writing: for a process that must end
    at once (a stopped worker) and leave nothing half-written."""
    for stage in list(_STAGING):
        shutil.rmtree(stage, ignore_errors=True)


def jsonable(obj):
    """`obj` as JSON's types: numpy scalars and arrays as Python numbers and lists, tuples
    as lists, keys as strings, and non-finite floats, which JSON lacks, as the strings
    "inf", "-inf" and "nan"."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if np.isfinite(v) else str(v)
    if isinstance(obj, (np.integer, np.bool_)):
        return obj.item()
    return obj


def write_json(path: str, obj) -> None:
    """`jsonable(obj)` as JSON, floats written exactly (repr); the file is replaced whole
    (written beside it, then renamed), so a reader or a kill never sees half of one."""
    text = json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n"
    part = f"{path}.part"
    with open(part, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(part, path)


def write_predictions(path: str, x: np.ndarray, mu: np.ndarray, sigma: np.ndarray,
                      y: np.ndarray | None = None) -> None:
    """CSV `x,mu,sigma` (with y: `x,y,mu,sigma`), input order; repr of float64 reads back
    exactly (float32 values included, since every float32 is a float64)."""
    names, arrays = (["x", "mu", "sigma"], [x, mu, sigma]) if y is None else (
        ["x", "y", "mu", "sigma"], [x, y, mu, sigma])
    columns = [np.asarray(a, np.float64).reshape(-1).tolist() for a in arrays]
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(",".join(names) + "\n")
        f.writelines(",".join(map(repr, row)) + "\n" for row in zip(*columns))


def read_predictions(path: str) -> dict[str, np.ndarray]:
    """A predictions file's columns by their header's names."""
    with open(path, encoding="utf-8") as f:
        names = f.readline().strip().split(",")
    data = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64, ndmin=2)
    return {n: data[:, i] for i, n in enumerate(names)}
