"""What runs when: the chunks a run's epochs are dispatched in, and the trunk segments that
rematerialisation recomputes together."""

from __future__ import annotations

import math
from typing import Iterator, NamedTuple


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
