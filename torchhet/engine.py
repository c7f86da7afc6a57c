"""The torch engine: a run's epochs through one of several loops; mirrors jaxhet/engine.py.

Loops, each a way to run the same SGD epoch:
- `eager`: the lecture's loop, `param.data -= param.grad * lr`, bit for bit;
- `optim`: torch.optim.SGD with its multi-tensor update (foreach; fused on CUDA);
- `compile`: forward and loss through `torch.compile` (Inductor fuses the element-wise
  work of the forward and, through AOTAutograd, of the backward), then the lecture's update
  as two multi-tensor ops (`g * lr`, then `p - that`: the lecture's two roundings);
- `cudagraph` (CUDA only): forward, backward and update captured once as one CUDA graph,
  replayed once per epoch (no Python, no per-kernel launch);
- `reduce-overhead` (CUDA only): `torch.compile(mode="reduce-overhead")`, Inductor's
  kernels replayed as CUDA graphs;
- `no-autograd`: the backward pass written out as matrix products into buffers allocated
  once, no autograd (torchhet/handgrad.py); not the lecture's rounding.

Each loop is a runner, `runner(n, losses)`: n epochs, their losses written into the device
tensor `losses[:n]`, nothing read back to the host. Warm-up (compiling, capturing) happens
in `make_runner`, is timed there, and leaves the weights as they were: the first epoch the
runner runs is the run's epoch 0, from the initial weights.

Failures are found by the host: the engine reads each chunk's losses and checks the
weights once per chunk (one sync, `in_flight = 1`); a chunk that went bad is replayed epoch
by epoch from a copy of the weights taken before it (the loops are deterministic) to name
the first epoch whose loss was not finite or whose update made a weight non-finite.

`remat=True` checkpoints the trunk in about sqrt(depth) segments (torch.utils.checkpoint,
non-reentrant): the backward pass recomputes a segment's activations instead of keeping
them; less memory, one more trunk forward.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from hetcore.backend import Chunk, EngineOptions, Final
from hetcore.errors import UsageError
from hetcore.schedule import chunk_length, remat_segments
from hetcore.settings import LOOPS as ALL_LOOPS
from hetcore.settings import Settings
from torchhet import handgrad
from torchhet.device import describe, matmul_precision, resolve_device, sync, to_device
from torchhet.model import gaussian_nll
from torchhet.weights import DTYPES, put, to_state_dict

LOOPS = ALL_LOOPS["torch"]  # named once, in hetcore.settings
CUDA_ONLY = ("cudagraph", "reduce-overhead")
WARMUP_STEPS = 3  # CUDA graph capture wants a few steps on a side stream first

# Chosen from scripts/bench.py's figures (docs/performance.md). CPU: `no-autograd` needs no
# warm-up and runs an epoch faster than `eager` (interleaved in one process, so that the
# machine's drift cancels), as fast as `compile` within the noise, whose Inductor compiles
# for seconds before its first epoch: it finishes first at every length. `optim` pays about
# a second on first use (torch.optim imports torch._dynamo) for no per-epoch gain at 8
# parameters. CUDA (chosen by reasoning, not yet measured): an epoch is a few dozen tiny
# kernels, so launch overhead dominates, and one graph replay per epoch, captured in
# milliseconds, finishes first.


def default_loop(device_type: str, remat: bool = False) -> str:
    """The loop that finishes a run soonest, warm-up included, on this device type (the
    same at every run length on the devices measured); with `remat`, the soonest of those
    that rematerialise."""
    if device_type == "cuda":
        return "cudagraph"
    if device_type == "cpu" and not remat:
        return "no-autograd"
    return "eager"


def forward_loss(model, x, y, full: bool, remat: bool = False) -> torch.Tensor:
    """The epoch's forward pass and loss; `remat` checkpoints the trunk by segments."""
    if remat:
        from torch.utils.checkpoint import checkpoint

        blocks = list(model.layers)  # Linear, ReLU, Linear, ReLU, ...
        h = x
        for start, stop in remat_segments(len(blocks) // 2):
            segment = torch.nn.Sequential(*blocks[2 * start:2 * stop])
            # No RNG in the model, and RNG state cannot be read inside a CUDA graph capture.
            h = checkpoint(segment, h, use_reentrant=False, preserve_rng_state=False)
        mu, var = model.heads(h)
    else:
        mu, var = model(x)
    return gaussian_nll(mu, var, y, full)


def manual_step(model, x, y, lr: float, full: bool, remat: bool = False) -> torch.Tensor:
    """The lecture's epoch: forward, backward, `param.data -= param.grad * lr`."""
    model.zero_grad()
    loss = forward_loss(model, x, y, full, remat)
    loss.backward()
    for param in model.parameters():
        param.data -= param.grad * lr
        param.grad = None
    return loss.detach()


def _lecture_update(params: list, lr: float) -> None:
    """`p -= g * lr` for every parameter in two multi-tensor kernels, rounding as the
    lecture's loop does (the product rounded, then the difference)."""
    with torch.no_grad():
        grads = [p.grad for p in params]
        torch._foreach_sub_(params, torch._foreach_mul(grads, lr))


def _snapshot(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _restore(model, saved: list[torch.Tensor]) -> None:
    """Back to the saved weights in place (addresses kept: CUDA graphs read them)."""
    with torch.no_grad():
        for p, s in zip(model.parameters(), saved):
            p.copy_(s)


def make_runner(loop: str, model, x, y, lr: float, full: bool, remat: bool = False):
    """(runner, warm-up seconds) for `loop`; see the module docstring."""
    if loop not in LOOPS:
        raise UsageError(f"--loop {loop}: not available in torchhet; it has {', '.join(LOOPS)}")
    device = x.device
    if loop in CUDA_ONLY and device.type != "cuda":
        raise UsageError(f"--loop {loop}: needs a CUDA device; torch is on {device.type}")
    if loop == "no-autograd":  # remat refused with the settings (hetcore.settings.NO_REMAT)
        return handgrad.make_runner(model, x, y, lr, full), 0.0
    params = list(model.parameters())
    t0 = time.perf_counter()

    if loop == "eager":
        def step():
            return manual_step(model, x, y, lr, full, remat)

    elif loop == "optim":
        fused = device.type == "cuda"
        opt = torch.optim.SGD(params, lr=lr, foreach=not fused, fused=fused or None)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = forward_loss(model, x, y, full, remat)
            loss.backward()
            opt.step()
            return loss.detach()

    elif loop in ("compile", "reduce-overhead"):
        mode = "reduce-overhead" if loop == "reduce-overhead" else None
        _allow_recompiles()
        compiled = torch.compile(
            lambda xs, ys: forward_loss(model, xs, ys, full, remat), mode=mode, dynamic=False
        )
        graphs = loop == "reduce-overhead"

        def step():
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            for p in params:
                p.grad = None
            loss = compiled(x, y)
            loss.backward()
            _lecture_update(params, lr)
            return loss.detach()

        # Compile (and record the graphs) on the run's own tensors, then put the weights
        # back: the runner's first epoch starts from the initial weights.
        saved = _snapshot(model)
        for _ in range(WARMUP_STEPS if graphs else 2):
            step()
        sync(device)
        _restore(model, saved)
        for p in params:
            p.grad = None

    else:  # cudagraph
        step = _capture(model, params, x, y, lr, full, remat)

    sync(device)
    warmup_s = time.perf_counter() - t0

    def runner(n: int, losses: torch.Tensor) -> None:
        for i in range(n):
            losses[i] = step()

    return runner, warmup_s


def _allow_recompiles(limit: int = 256) -> None:
    """Every runner compiles the same code for a new model (new guards); past dynamo's
    default limit of 8 it would fall back to eager without failing. Raise the limit."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(limit, getattr(torch._dynamo.config, name)))


def _capture(model, params, x, y, lr, full, remat):
    """One CUDA graph of forward, backward and update (PyTorch's whole-network capture
    recipe); returns a step that replays it and hands back its loss."""
    saved = _snapshot(model)
    side = torch.cuda.Stream(device=x.device)
    side.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
        for _ in range(WARMUP_STEPS):
            for p in params:
                p.grad = None
            forward_loss(model, x, y, full, remat).backward()
            _lecture_update(params, lr)
    torch.cuda.current_stream(x.device).wait_stream(side)
    for p in params:
        p.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = forward_loss(model, x, y, full, remat)
        static_loss.backward()  # grads land in the graph's pool, refilled on every replay
        _lecture_update(params, lr)
    _restore(model, saved)  # capture records without running; the warm-up steps ran

    def step():
        graph.replay()
        return static_loss.detach()

    return step


def _finite(params: list) -> bool:
    """Whether every weight is finite: one host sync, as the chunk's losses are read."""
    return bool(torch.stack([torch.isfinite(p).all() for p in params]).all())


class TorchEngine:
    """hetcore.backend.Engine for torch (see the module docstring)."""

    in_flight = 1

    def __init__(self, settings: Settings, x: np.ndarray, y: np.ndarray, weights: dict,
                 optimizer: dict | None = None, options: EngineOptions = EngineOptions()):
        if options.unroll != 1:
            raise UsageError(f"unroll {options.unroll}: torch's loops do not unroll (jax scan "
                             "does)")
        # Every loop is plain SGD without momentum: there is no optimiser state to restore.
        if optimizer:
            raise UsageError(f"--resume: optimizer state has {len(optimizer)} tensors, "
                             "expected none (plain SGD)")
        dev = resolve_device(settings.device)
        self.device, self._dev = describe(dev), dev
        self.precision, self.full = options.matmul_precision, settings.full
        self.loop = (default_loop(dev.type, settings.remat) if settings.loop == "auto"
                     else settings.loop)
        self.model = put(weights, settings.dtype, dev, settings.width, settings.depth)
        self.params = list(self.model.parameters())
        self.x, self.y = to_device(x, dev), to_device(y, dev)
        with matmul_precision(self.precision):
            self.runner, self.compile_s = make_runner(self.loop, self.model, self.x, self.y,
                                                      settings.lr, settings.full,
                                                      settings.remat)
        length = chunk_length(settings.epochs, settings.chunk_epochs, settings.checkpoint_every)
        self.losses = torch.empty(length, dtype=DTYPES[settings.dtype], device=dev)

    def launch(self, start: int, count: int):
        before = [p.detach().clone() for p in self.params]  # to replay a chunk that went bad
        with matmul_precision(self.precision):
            self.runner(count, self.losses)  # losses stay on the device until read
        return start, count, before

    def read(self, handle) -> Chunk:
        start, count, before = handle
        # A copy: on a CPU .numpy() shares the losses' memory, which a replay writes again.
        chunk = Chunk.from_losses(start, self.losses[:count].cpu().numpy().copy())
        if chunk.failed is None and _finite(self.params):
            return chunk
        # Replay the chunk epoch by epoch (deterministic) to name what failed first: a
        # non-finite loss, or an update that made the weights non-finite while its loss was
        # finite (the next loss is then nan).
        bad = None if chunk.failed is None else chunk.failed - start
        with torch.no_grad():
            for p, b in zip(self.params, before):
                p.copy_(b)
        with matmul_precision(self.precision):
            for i in range(count if bad is None else bad + 1):
                self.runner(1, self.losses)
                if not np.isfinite(chunk.losses[i]):
                    break
                if not _finite(self.params):
                    return Chunk(chunk.losses, start + i, update_failed=True)
        if bad is None:  # the replay stayed finite (a nondeterministic device): the weights
            # were non-finite by the chunk's end, which is all that is known
            return Chunk(chunk.losses, start + count - 1, update_failed=True)
        return chunk

    def state(self):
        return to_state_dict(self.model), {}

    def wait(self) -> None:
        sync(self._dev)

    def finish(self) -> Final:
        # The loop's own buffers (no-autograd keeps depth + 1 (N, width) blocks, CUDA graphs
        # a pool) go before the final forward pass allocates its own: not both at the peak.
        self.runner = None
        with torch.no_grad(), matmul_precision(self.precision):
            mu, var = self.model(self.x)
            loss = gaussian_nll(mu, var, self.y, self.full)
        return Final(to_state_dict(self.model), mu[:, 0].cpu().numpy(),
                     var[:, 0].cpu().numpy(), float(loss))
