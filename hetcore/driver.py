"""The run driver, written once for both frameworks: a run's chunks, the host syncs between
them (pipelined where the engine allows), the progress bar, divergence, checkpoints and
resume, and the RunResult.

A run is a pure function of (settings, data, initial weights): `train(backend, settings,
x, y, initial_weights)` builds the backend's engine and drives it chunk by chunk.
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field, replace

import numpy as np

from hetcore import checkpoint, interchange, metrics
from hetcore.backend import Backend, EngineOptions, Prediction
from hetcore.errors import TrainingDiverged, UsageError
from hetcore.schedule import chunk_length, epoch_orders, member_orders, spans
from hetcore.settings import Settings


@dataclass
class RunResult:
    """A finished run: histories and weights as numpy, torch layout for weights."""

    framework: str
    device: str
    dtype: str
    loss_history: np.ndarray  # (epochs,): loss of each epoch's forward pass, before its update
    initial_weights: dict[str, np.ndarray]
    weights: dict[str, np.ndarray]
    mu: np.ndarray  # (N,) final mean at the training points
    var: np.ndarray  # (N,) final variance
    final_loss: float  # loss of the final weights
    compile_s: float  # compile or warm-up seconds
    train_s: float  # seconds of training proper: of the epochs from resumed_at on
    versions: dict = field(default_factory=dict)
    loop: str = ""
    # On held-out data (when the run has them): the final predictions, and the training
    # loss function there at each chunk's end, (2, k): the epochs done, then the losses.
    held_out: Prediction | None = None
    held_out_curve: np.ndarray = field(default_factory=lambda: np.zeros((2, 0)))
    # An ensemble's (settings.ensemble = K > 1): loss_history, final_loss and the weights
    # above are the members' mean loss per epoch, mean final loss and stacked weights; mu
    # and var are the members' Gaussian mixture (hetcore.metrics.mixture), held_out too.
    # Each member's own: losses (epochs, K); predictions (K, N) and final losses (K,).
    member_losses: np.ndarray | None = None
    members: Prediction | None = None
    held_out_members: Prediction | None = None
    resumed_at: int = 0  # the epoch a resumed run went on from (its checkpoint's); else 0

    @property
    def sigma(self) -> np.ndarray:
        return np.sqrt(self.var.astype(np.float64))

    @property
    def held_out_sigma(self) -> np.ndarray | None:
        return None if self.held_out is None else np.sqrt(self.held_out.var.astype(np.float64))


class Progress:
    """A tqdm bar over epochs, moved once per chunk (off when stderr is not a terminal)."""

    def __init__(self, label: str, total: int):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=label, unit="epoch", file=sys.stderr,
                        dynamic_ncols=True, disable=None)

    def __call__(self, done: int, loss: float) -> None:
        self.bar.update(done - self.bar.n)
        self.bar.set_postfix(loss=f"{loss:.5f}")

    def close(self) -> None:
        self.bar.close()


def initial_weights(settings: Settings, backend: Backend) -> tuple[dict, str]:
    """A run's initial weights and where they came from: the --init-from file, the
    lecture's own draw, or `backend`'s initialiser at the settings' seed."""
    if settings.init_from is not None:
        w = interchange.read_weights(settings.init_from, settings.width, settings.depth,
                                     settings.dtype, settings.ensemble)
        return w, os.path.abspath(settings.init_from)
    if settings.lecture_weights:
        return interchange.cast(interchange.lecture_weights(), settings.dtype), "lecture"
    k = settings.ensemble
    if k > 1:
        w = interchange.stack([backend.init_weights(settings.width, settings.depth,
                                                    settings.dtype, settings.init_seed + i)
                               for i in range(k)])
        return w, (f"{backend.NAME} init(seed={settings.init_seed}..."
                   f"{settings.init_seed + k - 1})")
    w = backend.init_weights(settings.width, settings.depth, settings.dtype, settings.init_seed)
    return w, f"{backend.NAME} init(seed={settings.init_seed})"


def train(backend: Backend, settings: Settings, x: np.ndarray, y: np.ndarray,
          initial_weights: dict, *, progress: bool = False,
          resume: checkpoint.Checkpoint | None = None, checkpoint_path: str | None = None,
          checkpoint_extra: dict | None = None,
          options: EngineOptions = EngineOptions(),
          held_out: tuple[np.ndarray, np.ndarray] | None = None,
          writer: bool = True) -> RunResult:
    """Train from `initial_weights` (a state dict) on x, y (N, 1) as `settings` say.

    Args:
      backend: the framework (hetcore.backend.Backend).
      settings: the run; epochs, chunk length and checkpoint interval are read here, the
        rest by the backend's engine.
      x, y: training data, (N, 1) arrays of settings.dtype.
      initial_weights: torch-layout state dict of settings.dtype.
      progress: show a progress bar, moved once per chunk.
      resume: a checkpoint of this run (same settings and data) to continue from; the
        result is that of the uninterrupted run, bit for bit.
      checkpoint_path: where to write a checkpoint every settings.checkpoint_every epochs
        and at the end (replaced atomically); None: no checkpoints.
      checkpoint_extra: metadata the checkpoint carries for the command (e.g. where the
        initial weights came from).
      options: the engine's options (speed or rounding, never the maths).
      held_out: (x, y) (M, 1) held-out data of settings.dtype: the training loss function
        is taken there at each chunk's end, and the final model predicts there. They never
        change the training.
      writer: whether this process writes the checkpoints; in a run over several
        processes every one takes the engine's state at a checkpoint (an engine may gather
        it from the others), and process 0 alone writes it.

    Returns:
      RunResult. Raises TrainingDiverged at the first epoch whose loss is not finite or
      whose update made a weight non-finite; no checkpoint is written from such a chunk.
    """
    settings.check_run(len(x))
    digest = checkpoint.data_digest(x, y)
    k = settings.ensemble
    history = np.full((settings.epochs,) if k == 1 else (settings.epochs, k), np.nan)
    first = 0
    held_digest = "" if held_out is None else checkpoint.data_digest(*held_out)
    curve: list[tuple[int, float]] = []  # (epochs done, held-out loss) at each chunk's end
    if resume is not None:
        if resume.data_digest != digest:
            raise UsageError(f"--resume {os.path.dirname(resume.path) or resume.path}: the data "
                             "differ from those the run started with")
        first = resume.epoch
        history[:first] = resume.loss_history
        # A checkpoint written before runs tracked held-out data has no digest: the run
        # goes on, its held-out curve starting at the resumed epoch.
        if resume.held_out_digest not in ("", held_digest):
            raise UsageError(f"--resume {os.path.dirname(resume.path) or resume.path}: the "
                             "held-out data differ from those the run started with")
        curve = [(int(e), float(v)) for e, v in resume.held_out_curve.T]
    engine = backend.engine(settings, x, y,
                            initial_weights if resume is None else resume.weights,
                            None if resume is None else resume.optimizer, options,
                            held_out)
    length = chunk_length(settings.epochs, settings.chunk_epochs, settings.checkpoint_every)
    bar = Progress(f"{backend.NAME} train", settings.epochs) if progress else None

    pending: deque = deque()  # (span, handle) launched and not yet read
    failed = None  # the Chunk that named the first failure

    def consume() -> None:
        nonlocal failed
        span, handle = pending.popleft()
        chunk = engine.read(handle)
        history[span.start:span.start + span.count] = chunk.losses
        if chunk.held_out_loss is not None:
            curve.append((span.start + span.count, chunk.held_out_loss))
        if chunk.failed is not None:
            failed = chunk
        elif bar is not None:
            bar(span.start + span.count, float(np.mean(chunk.losses[-1])))

    t0 = time.perf_counter()
    try:
        shuffled = not settings.full_batch(len(x))
        for span in spans(first, settings.epochs, length, settings.checkpoint_every):
            # A mini-batch chunk's epoch orders are drawn here, once, while the device may
            # still run the chunk before it.
            orders = None
            if shuffled:
                orders = (epoch_orders(settings.shuffle_seed, span.start, span.count, len(x))
                          if k == 1 else member_orders(settings.shuffle_seed, k, span.start,
                                                       span.count, len(x)))
            pending.append((span, engine.launch(span.start, span.count, orders)))
            if span.checkpoint and checkpoint_path is not None:
                while pending and failed is None:
                    consume()
                if failed is None:  # a diverged chunk never replaces the last good one
                    weights, optimizer = engine.state()
                    end = span.start + span.count
                if failed is None and writer:
                    checkpoint.save(checkpoint_path, checkpoint.Checkpoint(
                        framework=backend.NAME, epoch=end, weights=weights,
                        optimizer=optimizer, loss_history=history[:end].astype(settings.dtype),
                        initial_weights=initial_weights, settings=settings.to_dict(),
                        data_digest=digest, extra=dict(checkpoint_extra or {}),
                        held_out_curve=_curve(curve), held_out_digest=held_digest))
            elif len(pending) >= engine.in_flight:  # read chunk c-1 while chunk c runs
                consume()
            if failed is not None:
                break
        while pending and failed is None:
            consume()
        engine.wait()
    finally:
        if bar is not None:
            bar.close()
    train_s = time.perf_counter() - t0
    if failed is not None:
        raise TrainingDiverged(backend.NAME, failed.failed,
                               float(np.ravel(history[failed.failed])[failed.member]),
                               weights=failed.update_failed, batch=failed.batch,
                               batches=settings.batches(len(x)),
                               member=failed.member if k > 1 else None)
    final = engine.finish()
    if k > 1:
        return replace(_ensemble_result(
            backend, engine, settings, x, y, initial_weights, history, final, train_s, curve),
            resumed_at=first)
    var, held = _mse_sigma(settings, y, final)
    return RunResult(
        framework=backend.NAME, device=engine.device, dtype=settings.dtype,
        loss_history=history.astype(settings.dtype), initial_weights=dict(initial_weights),
        weights=final.weights, mu=final.mu, var=var, final_loss=final.loss,
        compile_s=engine.compile_s, train_s=train_s, versions=backend.versions(),
        loop=engine.loop, held_out=held, held_out_curve=_curve(curve), resumed_at=first,
    )


def member_predictions(backend: Backend, result: RunResult, x: np.ndarray, device: str,
                       mse: bool) -> tuple[np.ndarray, np.ndarray]:
    """mu and var, (K, M) in float64, of each of a run's models (its one, or an ensemble's
    K members) at new inputs x (M, 1); an MSE run's var is each model's one value, the
    training residuals' mean square (_mse_sigma). Their Gaussian mixture is
    hetcore.metrics.mixture of the two."""
    one = result.members is None
    weights = [result.weights] if one else interchange.unstack(result.weights)
    mus, variances = [], []
    for k, w in enumerate(weights):
        mu, var, _ = backend.predict(w, x, device)
        mus.append(np.asarray(mu, np.float64)[:, 0])
        constant = result.var[0] if one else result.members.var[k][0]
        variances.append(np.full(len(x), float(constant)) if mse
                         else np.asarray(var, np.float64)[:, 0])
    return np.stack(mus), np.stack(variances)


def _mse_sigma(settings: Settings, y: np.ndarray, final) -> tuple[np.ndarray, Prediction | None]:
    """The final variance on the training and held-out data. An MSE run's variance head
    was never trained: its sigma is the training residuals' root mean square, the same at
    every x (an ensemble's: each member's own)."""
    if settings.loss != "mse":
        return final.var, final.held_out
    resid = y[:, 0].astype(np.float64) - np.asarray(final.mu, np.float64)
    rms2 = np.expand_dims(np.mean(resid ** 2, axis=-1), -1)  # (1,), or (K, 1) per member

    def at(mu):
        return np.broadcast_to(rms2, np.shape(mu)).astype(settings.dtype)

    held = final.held_out
    if held is not None:
        held = Prediction(held.mu, at(held.mu), held.loss)
    return at(final.mu), held


def _ensemble_result(backend, engine, settings, x, y, initial_weights, history, final,
                     train_s, curve) -> RunResult:
    """An ensemble's RunResult: the members' mixture, and each member's own predictions
    and losses."""
    mu = final.mu
    var, held = _mse_sigma(settings, y, final)
    mix_mu, mix_var = metrics.mixture(mu, var)
    held_mix = None
    if held is not None:
        held_mix = Prediction(*metrics.mixture(held.mu, held.var), float(np.mean(held.loss)))
    return RunResult(
        framework=backend.NAME, device=engine.device, dtype=settings.dtype,
        loss_history=history.mean(axis=1), initial_weights=dict(initial_weights),
        weights=final.weights, mu=mix_mu, var=mix_var,
        final_loss=float(np.mean(final.loss)), compile_s=engine.compile_s, train_s=train_s,
        versions=backend.versions(), loop=engine.loop, held_out=held_mix,
        held_out_curve=_curve(curve), member_losses=history.astype(settings.dtype),
        members=Prediction(mu, var, np.asarray(final.loss)), held_out_members=held)


def _curve(points: list[tuple[int, float]]) -> np.ndarray:
    """(2, k): the epochs, then the losses."""
    return np.asarray(points, np.float64).reshape(-1, 2).T.copy()
