"""What runs when: the chunks a run's epochs are dispatched in, the order and batches of a
mini-batch epoch, the learning rate of each update, and the trunk segments that
rematerialisation recomputes together."""

from __future__ import annotations

import math
from typing import Iterator, NamedTuple

import numpy as np


class Span(NamedTuple):
    """One chunk of a run: `count` epochs from epoch `start`; `checkpoint` says whether a
    checkpoint is due after it."""

    start: int
    count: int
    checkpoint: bool


def chunk_plan(epochs: int, chunk_epochs: int) -> tuple[int, int]:
    """(length, count) of the compiled chunks that cover `epochs`.

    Chunks are of equal length so that one compiled program serves them all; the last
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


def spans(start: int, epochs: int, length: int, every: int) -> Iterator[Span]:
    """The chunks from epoch `start` to `epochs`, at most `length` epochs each.

    No chunk crosses a multiple of `every` (0: no checkpoints), so checkpoints land on
    those epochs whatever the chunk length; the last chunk is always followed by one.
    """
    e = start
    while e < epochs:
        limit = min(epochs, (e // every + 1) * every) if every else epochs
        n = min(length, limit - e)
        yield Span(e, n, bool(every) and ((e + n) % every == 0 or e + n == epochs))
        e += n


def remat_segments(depth: int) -> list[tuple[int, int]]:
    """Trunk blocks [start, stop) rematerialised together: about sqrt(depth) segments, so
    that what stays in memory is one activation per segment boundary and, during the
    backward pass, one segment's worth (the classic sqrt(n) schedule). A Linear+ReLU block
    alone keeps nothing a segment would not: ReLU's saved output is the next Linear's input."""
    count = max(1, int(math.isqrt(depth)))
    bounds = [round(i * depth / count) for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def learning_rate(t: int, lr: float, total: int, schedule: str = "constant",
                  warmup_steps: int = 0, lr_end: float | None = None) -> float:
    """The learning rate of update t (0-based, counted over the whole run of `total`
    updates), in float64: lr * t / W while t < W, then lr (constant) or
    lr_end + (lr - lr_end) * (1 + cos(pi * (t - W) / (T - W))) / 2 (cosine), as optax's
    warmup_cosine_decay_schedule(0, lr, W, T, lr_end) has it."""
    if t < warmup_steps:
        return lr * t / warmup_steps
    if schedule == "constant":
        return lr
    end = lr_end or 0.0
    frac = min(t - warmup_steps, total - warmup_steps) / (total - warmup_steps)
    return end + (lr - end) * (1 + math.cos(math.pi * frac)) / 2


def epoch_order(shuffle_seed: int, epoch: int, n_points: int) -> np.ndarray:
    """The order in which epoch `epoch` visits the points (a mini-batch run's)."""
    return np.random.default_rng([shuffle_seed, epoch]).permutation(n_points)


def epoch_orders(shuffle_seed: int, start: int, count: int, n_points: int) -> np.ndarray:
    """(count, n_points) int32: epoch_order of epochs start .. start + count - 1."""
    return np.stack([epoch_order(shuffle_seed, e, n_points).astype(np.int32)
                     for e in range(start, start + count)])


def member_orders(shuffle_seed: int, members: int, start: int, count: int, n_points: int
                  ) -> np.ndarray:
    """(count, members, n_points) int32: member k's epoch orders (shuffle seed + k)."""
    return np.stack([epoch_orders(shuffle_seed + k, start, count, n_points)
                     for k in range(members)], axis=1)


def batch_sizes(n_points: int, batch_size: int | None) -> list[int]:
    """The sizes of an epoch's consecutive batches; the last one shorter when batch_size
    does not divide n_points."""
    b = n_points if batch_size is None else min(batch_size, n_points)
    return [min(b, n_points - i) for i in range(0, n_points, b)]


def shard_bounds(batch: int, devices: int, rank: int) -> tuple[int, int]:
    """The points [lo, hi) of a batch of `batch` points that device (or process) `rank` of
    `devices` takes in a data-parallel run: contiguous blocks of ceil(batch / devices), the
    last ones shorter or empty. Each computes the sum of its points' losses over `batch`;
    the devices' sums add up to the batch's mean, however unevenly it split."""
    size = -(-batch // devices)
    return min(rank * size, batch), min((rank + 1) * size, batch)
