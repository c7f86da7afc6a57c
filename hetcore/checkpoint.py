"""Checkpoints: one safetensors file per framework, replaced atomically.

A checkpoint holds everything a run needs to continue exactly where it stopped: the
weights, the optimiser state, the loss history so far, the initial weights, the settings
and a digest of the data. It is one file (`checkpoint-<framework>.safetensors` in the run
directory), written under a temporary name and renamed over the old one, so a kill at any
moment leaves either the previous checkpoint or the new one, never a mixture.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

import numpy as np

from hetcore import interchange
from hetcore.errors import UsageError
from hetcore.settings import BACKENDS, Settings

FORMAT = "jaxhet-checkpoint-1"


@dataclass
class Checkpoint:
    framework: str
    epoch: int  # epochs done; the next epoch to run
    weights: dict[str, np.ndarray]
    optimizer: dict[str, np.ndarray]  # flattened optimiser state (empty for plain SGD)
    loss_history: np.ndarray  # (epoch,)
    initial_weights: dict[str, np.ndarray]
    settings: dict
    data_digest: str
    extra: dict = field(default_factory=dict)
    path: str = ""  # the file it was loaded from
    # The held-out loss at each chunk's end so far: (2, k) epochs and losses (empty: none),
    # and the digest of the held-out data it was taken on ("" without them).
    held_out_curve: np.ndarray = field(default_factory=lambda: np.zeros((2, 0)))
    held_out_digest: str = ""


def filename(framework: str) -> str:
    return f"checkpoint-{framework}.safetensors"


def data_digest(x: np.ndarray, y: np.ndarray) -> str:
    """sha256 of the training data as used (dtype and shape included)."""
    h = hashlib.sha256()
    for a in (x, y):
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save(path: str, ckpt: Checkpoint) -> None:
    """Write `ckpt` to `path` atomically (temporary file, fsync, rename)."""
    tensors = {f"weights/{n}": a for n, a in ckpt.weights.items()}
    tensors |= {f"initial/{n}": a for n, a in ckpt.initial_weights.items()}
    tensors |= {f"optimizer/{n}": a for n, a in ckpt.optimizer.items()}
    tensors["loss_history"] = np.asarray(ckpt.loss_history)
    tensors["held_out_curve"] = np.asarray(ckpt.held_out_curve, np.float64).reshape(2, -1)
    meta = {
        "format": FORMAT, "framework": ckpt.framework, "epoch": ckpt.epoch,
        "settings": ckpt.settings, "data_digest": ckpt.data_digest, "extra": ckpt.extra,
        "held_out_digest": ckpt.held_out_digest,
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        interchange.write(tmp, tensors, meta)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load(path: str, label: str = "--resume") -> Checkpoint:
    """Read and check a checkpoint; any defect is a UsageError naming the file."""
    tensors = interchange.read(path, label=label)
    try:
        meta = interchange.read_metadata(path, label)
        if meta.get("format") != FORMAT:
            raise ValueError(f"format is {meta.get('format')!r}, expected {FORMAT!r}")
        settings = dict(meta["settings"])
        epoch = int(meta["epoch"])
        extra = dict(meta.get("extra", {}))
        framework = str(meta["framework"])
        digest = str(meta["data_digest"])
        held_digest = str(meta.get("held_out_digest", ""))
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise UsageError(f"{label} {path}: not a checkpoint of this project ({e})") from None
    members = int(settings.get("ensemble") or 1) if isinstance(settings, dict) else 1
    history = tensors.get("loss_history")
    want = (epoch,) if members == 1 else (epoch, members)
    if history is None or history.shape != want:
        raise UsageError(f"{label} {path}: loss_history does not hold {epoch} epochs"
                         + ("" if members == 1 else f" of {members} members"))
    if not np.isfinite(history).all():
        raise UsageError(f"{label} {path}: loss_history holds non-finite values")

    curve = tensors.get("held_out_curve", np.zeros((2, 0)))
    if curve.ndim != 2 or curve.shape[0] != 2 or not np.isfinite(curve).all():
        raise UsageError(f"{label} {path}: held_out_curve is not (2, k) finite numbers")

    def part(prefix):
        return {n[len(prefix):]: a for n, a in tensors.items() if n.startswith(prefix)}

    ckpt = Checkpoint(framework=framework, epoch=epoch, weights=part("weights/"),
                      optimizer=part("optimizer/"), loss_history=history,
                      initial_weights=part("initial/"), settings=settings,
                      data_digest=digest, extra=extra, path=path, held_out_curve=curve,
                      held_out_digest=held_digest)
    try:
        s = Settings(**settings)
    except (TypeError, UsageError) as e:
        raise UsageError(f"{label} {path}: settings do not fit this version ({e})") from None
    if not 0 < epoch <= s.epochs:
        raise UsageError(f"{label} {path}: epoch {epoch} is outside the run's 1..{s.epochs}")
    for what, state in (("weights", ckpt.weights), ("initial weights", ckpt.initial_weights)):
        if s.ensemble == 1:
            interchange.check(state, s.width, s.depth, s.dtype, label=f"{label} {path}: {what}")
        else:
            interchange.check_stacked(state, s.ensemble, s.width, s.depth, s.dtype,
                                      label=f"{label} {path}: {what}")
    for n, a in ckpt.optimizer.items():
        if not np.isfinite(a).all():
            raise UsageError(f"{label} {path}: optimizer tensor '{n}' holds non-finite values")
    return ckpt


def find(out: str, label: str = "--resume") -> dict[str, Checkpoint]:
    """The checkpoints of the unfinished run in directory `out`, by framework, checked to
    belong to one run; any defect is a UsageError naming the directory."""
    if not os.path.isdir(out):
        raise UsageError(f"{label} {out}: no such directory")
    found = {fw: os.path.join(out, filename(fw)) for fw in BACKENDS}
    found = {fw: p for fw, p in found.items() if os.path.isfile(p)}
    if not found:
        raise UsageError(f"{label} {out}: holds no checkpoint (checkpoint-*.safetensors); "
                         "was the run started with --checkpoint-every?")
    ckpts = {fw: load(p, label) for fw, p in found.items()}
    first = next(iter(ckpts.values()))
    for fw, c in ckpts.items():
        if c.settings != first.settings or c.framework != fw:
            raise UsageError(f"{label} {out}: {filename(fw)} belongs to another run")
    return ckpts
