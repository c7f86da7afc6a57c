"""The backend contract: what a framework package provides, so that the run driver, the
comparison criteria and the commands are written once for both.

`jaxhet.backend` and `torchhet.backend` each implement `Backend` as a module (its
functions and constants); `hetapps.registry` maps a framework's name to it. Weights cross
the seam as state dicts: the interchange file's tensor names and torch layout, numpy arrays
(hetcore.interchange). Devices are the framework's own objects, opaque here.

A training run is an `Engine` (one per run, from `Backend.engine`): it runs a chunk of
epochs from its state when launched, reports the chunk's losses and the first epoch that
failed when read, and hands back its state for a checkpoint. How it finds the failed epoch
(a failure index carried in a compiled loop, a replay of the chunk) is its own business;
`Chunk` is what the driver sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

StateDict = dict[str, np.ndarray]


@dataclass(frozen=True)
class EngineOptions:
    """Ways to run the same training that change speed or rounding, never the maths; the
    benchmark times them as variants, and a run records them.

    Attributes:
      unroll: JAX's `scan` iterations per loop body. 1 (the default) is one epoch per
        iteration: on a CPU, unrolling was within the noise and doubled compile time
        (docs/performance.md). Other loops, and torch's, refuse any other value.
      matmul_precision: "highest" (full float32 products, every device) or "tf32" (the
        device's fast reduced-precision float32 products where it has them: TF32 on
        recent NVIDIA GPUs; a CPU computes in float32 either way).
      members: how a JAX ensemble runs its members' epochs in its one program: "vmap" (the
        members' products batched), "map" (one member after another, each with one
        model's products), or "auto" (the faster for the width, measured:
        jaxhet.ensemble.MAP_FROM_WIDTH). torch's ensemble refuses any other value.
    """

    unroll: int = 1
    matmul_precision: str = "highest"
    members: str = "auto"

    def __post_init__(self):
        if isinstance(self.unroll, bool) or not isinstance(self.unroll, int) or self.unroll < 1:
            raise ValueError(f"unroll must be a positive integer, got {self.unroll!r}")
        if self.matmul_precision not in PRECISIONS:
            raise ValueError(f"matmul_precision must be one of {PRECISIONS}, got "
                             f"{self.matmul_precision!r}")
        if self.members not in MEMBER_LOOPS:
            raise ValueError(f"members must be one of {MEMBER_LOOPS}, got {self.members!r}")


PRECISIONS = ("highest", "tf32")
MEMBER_LOOPS = ("auto", "vmap", "map")


@dataclass(frozen=True)
class Chunk:
    """A finished chunk as the driver reads it.

    losses: (count,) each epoch's loss: the point-weighted mean of its batches' losses, each
      taken before its own update (one batch: the loss of the epoch's forward pass).
    failed: the first epoch (counted over the whole run) whose loss was not finite or whose
      update made a weight non-finite; None when every epoch was finite.
    update_failed: whether `failed` names an update (its loss was finite) rather than a loss.
    batch: the batch of epoch `failed` that failed (0 in a full-batch run).
    held_out_loss: the training loss function of the weights at the chunk's end on the
      held-out data, when the engine has them (else None).
    member: the ensemble's member that failed first at `failed` (0 for one model).

    An ensemble's engine (settings.ensemble = K > 1) reports `losses` as (count, K), each
    member's, and `held_out_loss` as the members' mean.
    """

    losses: np.ndarray
    failed: int | None = None
    update_failed: bool = False
    batch: int = 0
    held_out_loss: float | None = None
    member: int = 0

    @classmethod
    def from_losses(cls, start: int, losses: np.ndarray) -> "Chunk":
        """A chunk whose only failure can be a non-finite loss."""
        bad = ~np.isfinite(losses)
        return cls(losses, start + int(np.argmax(bad)) if bad.any() else None)


@dataclass(frozen=True)
class Prediction:
    """A model's predictive Gaussians on some data: mean, variance, and the training loss
    function's value there."""

    mu: np.ndarray  # (N,); an ensemble's members: (K, N)
    var: np.ndarray  # (N,); (K, N)
    loss: float  # an ensemble's members: (K,)


@dataclass(frozen=True)
class Final:
    """The trained model: its weights (state dict) and its predictions and loss on the
    training data (and on the held-out data, when the engine has them). An ensemble's:
    stacked weights (a leading member axis), mu and var (K, N), loss (K,), each member's."""

    weights: StateDict
    mu: np.ndarray  # (N,)
    var: np.ndarray  # (N,)
    loss: float
    held_out: Prediction | None = None


@runtime_checkable
class Engine(Protocol):
    """One training run on one device, n epochs at a time.

    Attributes:
      loop: the training loop it runs (a name of hetcore.settings.LOOPS; an ensemble's:
        "scan" in JAX, "func" in torch, torch.func).
      device: the device it runs on, described (Backend.describe).
      compile_s: seconds spent compiling or warming up before the first epoch.
      in_flight: how many launched chunks the driver may hold unread; 2 lets the host read
        chunk c-1 while the device runs chunk c, 1 reads each chunk before the next.

    Held-out data, when given to Backend.engine, are evaluated on the device after every
    chunk (Chunk.held_out_loss, queued behind the chunk, no extra host sync) and once more
    by `finish` (Final.held_out).
    """

    loop: str
    device: str
    compile_s: float
    in_flight: int

    def launch(self, start: int, count: int, orders: np.ndarray | None = None) -> Any:
        """Run (or queue) epochs start .. start + count - 1; returns a handle for `read`.
        orders: (count, N) the order each epoch visits the points in (a mini-batch run;
        hetcore.schedule.epoch_orders; an ensemble's: (count, K, N), each member's), None
        for full batches. Updates after a failed one change nothing."""

    def read(self, handle: Any) -> Chunk:
        """The chunk's losses and first failure (waits for the chunk if need be)."""

    def state(self) -> tuple[StateDict, dict[str, np.ndarray]]:
        """Host copies of the weights and the optimiser state (flattened, named) after every
        chunk launched so far; what a checkpoint keeps."""

    def wait(self) -> None:
        """Block until every launched chunk has finished on the device."""

    def finish(self) -> Final:
        """Release the loop's own buffers, then predict on the training data."""


@runtime_checkable
class Backend(Protocol):
    """A framework package's side of the seam (jaxhet.backend, torchhet.backend)."""

    NAME: str  # "jax" or "torch"
    LOOPS: tuple[str, ...]

    def resolve_device(self, name: str) -> Any:
        """The device for --device `name` (auto, cpu, gpu, tpu); UsageError listing those
        present when it is absent."""

    def describe(self, device: Any) -> str:
        """A short name for reports, e.g. 'cpu:0 (cpu)'."""

    def platform(self, device: Any) -> str:
        """The kind of device: "cpu", "gpu" or "tpu"."""

    def memory_bytes(self, device: Any) -> int:
        """Memory the device offers, for refusing runs that cannot fit."""

    def init_weights(self, width: int, depth: int, dtype: str, seed: int) -> StateDict:
        """Initial weights drawn from `seed` with the framework's own generator
        (hetcore.interchange.init_bounds's law)."""

    def predict(self, weights: StateDict, x: np.ndarray, device: str = "auto",
                full: bool = False, y: np.ndarray | None = None, loss: str = "nll",
                beta: float | None = None):
        """(mu, var, loss) as numpy for inputs x (N, 1); the loss (hetcore.settings.LOSSES)
        needs y (else None)."""

    def loss_and_grad(self, weights: StateDict, x: np.ndarray, y: np.ndarray,
                      device: str = "auto", full: bool = False, loss: str = "nll",
                      beta: float | None = None) -> tuple[float, StateDict]:
        """The loss and every parameter's gradient, gradients as a state dict (an MSE
        run's variance head: zeros)."""

    def versions(self) -> dict:
        """Versions of the framework and its libraries, for metrics.json."""

    def join(self, settings, cluster: dict) -> tuple[int, int]:
        """Join the run's other processes, if it has any, before any device is used;
        returns (this process's index, the process count); index 0 writes the outputs.
        cluster: the command's --coordinator, --num-processes and --process-id (None when
        not given); jax joins through them, torch through torch.distributed's environment
        variables (set by torchrun or hetapps.launch). UsageError for what cannot be
        joined."""

    def leave(self) -> None:
        """Leave the processes joined (nothing after a one-process run)."""

    def engine(self, settings, x: np.ndarray, y: np.ndarray, weights: StateDict,
               optimizer: dict[str, np.ndarray] | None = None,
               options: EngineOptions = EngineOptions(),
               held_out: tuple[np.ndarray, np.ndarray] | None = None) -> Engine:
        """An engine for `settings` (dtype, device, loop, lr, loss, chunk length, ensemble,
        devices: data-parallel over a mesh (jax) or the processes joined (torch))
        on x, y (N, 1) from `weights` (an ensemble's: stacked), and from `optimizer` (a
        checkpoint's optimiser state) when resuming; `held_out`: (x, y) (M, 1) data to
        evaluate on after every chunk and at the end. Compiles or warms up before it
        returns."""


@runtime_checkable
class Measure(Protocol):
    """What the benchmark measures inside a framework (jaxhet.measure, torchhet.measure).
    Devices are named as --device names them; the others run on settings.device."""

    def matmul_seconds(self, size: int, dtype: str, device: str, repeats: int) -> list[float]:
        """Seconds of each of `repeats` (size x size) @ (size x size) products at full
        precision."""

    def floor_seconds(self, n: int, width: int, depth: int, dtype: str, device: str,
                      repeats: int, batch: int | None = None, members: int = 1) -> list[float]:
        """One epoch's own matrix products back to back (the matmul floor): one update's
        at each of the epoch's batch shapes (`batch`: None for one of every point), batched
        over an ensemble's `members`."""

    def epoch_flops(self, settings, x, y, weights) -> float | None:
        """FLOPs of one epoch as the framework's compiler counts them (None: it does not)."""

    def program_memory(self, settings, x, y, weights,
                       options: EngineOptions = EngineOptions()) -> dict | None:
        """The compiled training program's buffer plan in bytes, `peak` among them (None:
        the framework plans no buffers ahead)."""

    def activation_bytes(self, settings, x, y, weights) -> int:
        """Bytes the backward pass keeps from the forward pass (weights and data excluded)."""

    def reset_peak(self, device: str) -> None:
        """Start counting the device allocator's peak afresh (where it keeps one)."""

    def peak_bytes(self, device: str) -> int | None:
        """The device allocator's peak since reset_peak, or None where it keeps none."""

    def release(self, device: str) -> None:
        """Hand memory the framework caches for reuse back to the device."""

    def set_threads(self, threads: int) -> None:
        """Compute on `threads` CPU threads (the process's CPU affinity is set already)."""
