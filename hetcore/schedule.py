"""What a training run returns, the same in both frameworks."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


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
    train_s: float  # seconds of training proper
    versions: dict = field(default_factory=dict)
    loop: str = ""

    @property
    def sigma(self) -> np.ndarray:
        return np.sqrt(self.var.astype(np.float64))


def chunk_plan(epochs: int, chunk_epochs: int) -> tuple[int, int]:
    """(length, count) of the compiled chunks that cover `epochs`.

    Chunks are of equal length so that one compiled function serves them all; the last
    chunk masks at most count-1 epochs. The length depends on the epoch count only, never
    on data or weights.
    """
    count = math.ceil(epochs / chunk_epochs)
    return math.ceil(epochs / count), count


def chunk_length(epochs: int, chunk_epochs: int, checkpoint_every: int = 0) -> int:
    """Compiled chunk length of a run: chunks never cross a checkpoint, so with checkpoints
    every K epochs the length divides the K-epoch segment as evenly as it can."""
    span = min(checkpoint_every, epochs) if checkpoint_every else epochs
    return chunk_plan(span, chunk_epochs)[0]


def first_nonfinite(losses: np.ndarray) -> int | None:
    bad = ~np.isfinite(losses)
    return int(np.argmax(bad)) if bad.any() else None


def remat_segments(depth: int) -> list[tuple[int, int]]:
    """Trunk blocks [start, stop) rematerialised together: about sqrt(depth) segments, so
    that what stays in memory is one activation per segment boundary and, during the
    backward pass, one segment's worth (the classic sqrt(n) schedule). A Linear+ReLU block
    alone keeps nothing a segment would not: ReLU's saved output is the next Linear's input."""
    count = max(1, int(math.isqrt(depth)))
    bounds = [round(i * depth / count) for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:]))
