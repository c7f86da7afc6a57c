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
  once, no autograd (torchhet/handgrad.py); not the lecture's rounding;
- `compile-update`: whole updates (torch.func's gradient, torch.optim's functional step),
  several batches a call, traced into one graph by `torch.compile` (torchhet/whole.py):
  every optimiser and batch size, for mini-batch runs whose per-update overhead dominates.

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

import copy
import dataclasses
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from hetcore.backend import Chunk, EngineOptions, Final, Prediction
from hetcore.errors import UsageError
from hetcore.schedule import batch_sizes, chunk_length, remat_segments
from hetcore.settings import LOOPS as ALL_LOOPS
from hetcore.settings import Settings
from torchhet import handgrad, optim, parallel, whole
from torchhet.device import arithmetic, describe, resolve_device, sync, to_device
from torchhet.model import point_loss, training_loss
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
# milliseconds, finishes first. Where a loop does not do what the settings ask (the
# lecture's update alone, full batches alone), the next one that does.


def unsupported(loop: str, settings: Settings, n_points: int) -> str | None:
    """Why `loop` cannot run these settings, or None. no-autograd writes out the lecture's
    epoch (full-batch plain SGD on the NLL); the CUDA graphs capture one full-batch epoch
    with its learning rate; eager is the lecture's update, plain SGD (its learning rate may
    follow a schedule); optim and compile take every optimiser and batch size."""
    full = settings.full_batch(n_points)
    plain = settings.optimizer == "sgd" and not settings.momentum
    if loop == "no-autograd" and not (settings.plain_sgd and full and settings.loss == "nll"):
        return ("writes out the lecture's epoch alone: full-batch SGD without momentum or "
                "schedule on --loss nll")
    if loop in CUDA_ONLY and not (settings.plain_sgd and full):
        return "captures one full-batch epoch of plain SGD at a constant learning rate"
    if loop == "eager" and not plain:
        return "is the lecture's update, plain SGD without momentum"
    if loop == "compile-update":
        return whole.supports(settings)
    return None


# compile-update against optim on the CPU (docs/performance.md, 2026-12-03): about 0.5 ms
# saved an update on 2 cores (20,000 points, width 128, batches of 250, Adam: 15 ms an epoch
# against 58 in the same run), for 44 s of compiling the first time and 4-5 s once
# Inductor's cache on disk holds its C++. It finishes first from about 80,000 updates the
# first time, 10,000 after: a bound between the two.
COMPILE_UPDATE_FROM = 60_000


def repays_compiling(device_type: str, settings: Settings, n_points: int) -> bool:
    """Whether compile-update finishes these settings' run first, as measured: on a CPU,
    from COMPILE_UPDATE_FROM updates (an ensemble's too: 16 members at width 64 saved 2.3 ms
    an update for 17 s of compiling, so the bound is on the safe side there)."""
    return device_type == "cpu" and \
        settings.epochs * settings.batches(n_points) >= COMPILE_UPDATE_FROM


def default_loop(device_type: str, settings: Settings, n_points: int) -> str:
    """The loop that finishes a run soonest, warm-up included, among those that run the
    settings: on a CPU, compile-update for runs of COMPILE_UPDATE_FROM updates or more that
    no-autograd does not run, else the same loop at every run length on the devices
    measured."""
    order = (() if settings.devices > 1 else ("cudagraph",) if device_type == "cuda" else
             () if settings.remat else ("no-autograd",) + (
                 ("compile-update",) if repays_compiling(device_type, settings, n_points)
                 else ())) + ("eager", "optim")
    return next(loop for loop in order if unsupported(loop, settings, n_points) is None)


def forward(model, x, remat: bool = False):
    """mu and var on x; `remat` checkpoints the trunk by segments."""
    if not remat:
        return model(x)
    from torch.utils.checkpoint import checkpoint

    blocks = list(model.layers)  # Linear, ReLU, Linear, ReLU, ...
    h = x
    for start, stop in remat_segments(len(blocks) // 2):
        segment = torch.nn.Sequential(*blocks[2 * start:2 * stop])
        # No RNG in the model, and RNG state cannot be read inside a CUDA graph capture.
        h = checkpoint(segment, h, use_reentrant=False, preserve_rng_state=False)
    return model.heads(h)


def forward_loss(model, x, y, full: bool, remat: bool = False, loss: str = "nll",
                 beta: float | None = None) -> torch.Tensor:
    """The forward pass and training loss on a batch."""
    mu, var = forward(model, x, remat)
    return training_loss(loss, mu, var, y, full, beta)


def manual_step(model, x, y, lr: float, full: bool, remat: bool = False, loss: str = "nll",
                beta: float | None = None, forward=forward_loss) -> torch.Tensor:
    """The lecture's update: forward, backward, `param.data -= param.grad * lr` (a
    parameter without a gradient, an MSE run's variance head, is left as it is)."""
    model.zero_grad()
    value = forward(model, x, y, full, remat, loss, beta)
    value.backward()
    for param in model.parameters():
        if param.grad is not None:
            param.data -= param.grad * lr
        param.grad = None
    return value.detach()


def refuse_unroll(options: EngineOptions) -> None:
    """torch's loops have nothing to unroll (JAX's scan has): any other unroll is refused."""
    if options.unroll != 1:
        raise UsageError(f"unroll {options.unroll}: torch's loops do not unroll (jax scan "
                         "does)")


def over_batches(sizes: list[int], step: Callable, check: Callable | None = None):
    """One epoch's batches of these sizes: step(start, size, b) makes batch b's update and
    returns its loss (a tensor: one model's, or an ensemble's (K,)); check(b, loss), if
    given, runs after each. Returns the point-weighted mean of the losses, summed as
    jaxhet sums them: the whole batches, then the shorter last one."""
    whole, start, total, last = sizes[0], 0, 0.0, None
    for b, size in enumerate(sizes):
        value = step(start, size, b)
        if check is not None:
            check(b, value)
        if size == whole:
            total = total + value
        else:
            last = value * size
        start += size
    total = total * whole
    return (total if last is None else total + last) / start


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


@dataclass
class Runner:
    """A loop, ready to run. step(xb, yb, t): update t (counted over the run) on one batch,
    returning its loss on the device (None for the loops that only run full batches);
    run(count, losses, start): `count` full-batch epochs from epoch `start`, their losses
    written into the device tensor losses[:count]; opt: the torch.optim optimiser, if the
    loop has one; warmup_s: compiling or capturing, before the first epoch; batches(xe, ye,
    t): a loop's own way through an epoch's batches (the points gathered in the epoch's
    order, from update t), returning their losses, one a batch (None: step, batch by
    batch)."""

    run: Callable
    step: Callable | None = None
    opt: torch.optim.Optimizer | None = None
    warmup_s: float = 0.0
    batches: Callable | None = None


def _same(value):
    return value


def make_runner(loop: str, model, x, y, settings: Settings, n_points: int | None = None,
                loss_of=forward_loss, report=_same) -> Runner:
    """The Runner of `loop` for these settings on the full data x, y; warm-up (compiling,
    capturing) leaves the weights and the optimiser as they were, so that the first epoch
    it runs is the run's epoch 0. The eager and optim loops take a batch's loss from
    `loss_of` (forward_loss's arguments) and report `report` of it: a data-parallel run's
    share and the batch's total (torchhet.parallel)."""
    n_points = x.shape[0] if n_points is None else n_points
    if loop not in LOOPS:
        raise UsageError(f"--loop {loop}: not available in torchhet; it has {', '.join(LOOPS)}")
    device = x.device
    if loop in CUDA_ONLY and device.type != "cuda":
        raise UsageError(f"--loop {loop}: needs a CUDA device; torch is on {device.type}")
    why = unsupported(loop, settings, n_points)
    if why:
        raise UsageError(f"--loop {loop}: {why}; --loop optim (or auto) runs these settings")
    lr, full, remat = settings.lr, settings.full, settings.remat
    loss, beta = settings.loss, settings.beta
    if loop == "no-autograd":  # remat refused with the settings (hetcore.settings.NO_REMAT)
        epochs = handgrad.make_runner(model, x, y, lr, full)
        return Runner(lambda count, losses, start: epochs(count, losses))
    if loop == "compile-update":
        return Runner(*whole.make(model, x, y, settings, n_points))
    params = list(model.parameters())
    schedule = optim.Schedule(settings, n_points)
    t0 = time.perf_counter()
    opt = None

    if loop == "eager":
        def step(xb, yb, t):
            return report(manual_step(model, xb, yb, schedule(t), full, remat, loss, beta,
                                      loss_of))

    elif loop == "optim":
        opt = optim.make(settings, params, device)

        def step(xb, yb, t):
            opt.zero_grad(set_to_none=True)
            value = loss_of(model, xb, yb, full, remat, loss, beta)
            value.backward()
            schedule.set(opt, t)
            opt.step()
            return report(value.detach())

    elif loop in ("compile", "reduce-overhead"):
        mode = "reduce-overhead" if loop == "reduce-overhead" else None
        whole.allow_recompiles()
        compiled = torch.compile(
            lambda xs, ys: forward_loss(model, xs, ys, full, remat, loss, beta), mode=mode,
            dynamic=False)
        graphs = loop == "reduce-overhead"
        opt = None if settings.plain_sgd else optim.make(settings, params, device)

        def step(xb, yb, t):
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            for p in params:
                p.grad = None
            value = compiled(xb, yb)
            value.backward()
            if opt is None:
                _lecture_update([p for p in params if p.grad is not None], schedule(t))
            else:
                schedule.set(opt, t)
                opt.step()
            return value.detach()

        # Compile (and record the graphs) for each batch shape on the run's own tensors,
        # forward and backward only: the weights and the optimiser stay as they were.
        sizes = sorted(set(batch_sizes(n_points, None if settings.full_batch(n_points)
                                       else settings.batch_size)))
        for size in sizes:
            for _ in range(WARMUP_STEPS if graphs else 2):
                if graphs:
                    torch.compiler.cudagraph_mark_step_begin()
                compiled(x[:size], y[:size]).backward()
        for p in params:
            p.grad = None

    else:  # cudagraph
        step = _capture(model, params, x, y, lr, full, remat, loss, beta)
        sync(device)
        return _full_batch(step, warmup_s=time.perf_counter() - t0)

    sync(device)
    warmup_s = time.perf_counter() - t0

    def run(count: int, losses: torch.Tensor, start: int) -> None:
        for i in range(count):
            losses[i] = step(x, y, start + i)

    if loop == "reduce-overhead":  # full batches alone (see unsupported)
        return Runner(run, None, opt, warmup_s)
    return Runner(run, step, opt, warmup_s)


def _full_batch(step: Callable, warmup_s: float) -> Runner:
    def run(count: int, losses: torch.Tensor, start: int) -> None:
        for i in range(count):
            losses[i] = step()

    return Runner(run, None, None, warmup_s)


def _capture(model, params, x, y, lr, full, remat, loss="nll", beta=None):
    """One CUDA graph of forward, backward and update (PyTorch's whole-network capture
    recipe); returns a step that replays it and hands back its loss."""
    saved = _snapshot(model)
    side = torch.cuda.Stream(device=x.device)
    side.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
        for _ in range(WARMUP_STEPS):
            for p in params:
                p.grad = None
            forward_loss(model, x, y, full, remat, loss, beta).backward()
            _lecture_update([p for p in params if p.grad is not None], lr)
    torch.cuda.current_stream(x.device).wait_stream(side)
    for p in params:
        p.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = forward_loss(model, x, y, full, remat, loss, beta)
        static_loss.backward()  # grads land in the graph's pool, refilled on every replay
        _lecture_update([p for p in params if p.grad is not None], lr)
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
                 optimizer: dict | None = None, options: EngineOptions = EngineOptions(),
                 held_out: tuple[np.ndarray, np.ndarray] | None = None):
        refuse_unroll(options)
        dev = resolve_device(settings.device)
        parallel_run = settings.devices > 1
        if parallel_run:  # one process of several (torchhet.parallel)
            dev = parallel.local_device(dev)
            parallel.initialize(dev)
        n = x.shape[0]
        self.device, self._dev = describe(dev), dev
        self.precision, self.settings = options.matmul_precision, settings
        self.loop = (default_loop(dev.type, settings, n) if settings.loop == "auto"
                     else settings.loop)
        self.model = put(weights, settings.dtype, dev, settings.width, settings.depth)
        self.names = [name for name, _ in self.model.named_parameters()]
        self.params = list(self.model.parameters())
        self.x, self.y = to_device(x, dev), to_device(y, dev)
        self.held = None if held_out is None else tuple(to_device(a, dev) for a in held_out)
        shared = {}
        if parallel_run:
            frozen = list(self.model.var_head.parameters()) if settings.loss == "mse" else []
            shared = dict(zip(("loss_of", "report"), parallel.data_parallel(
                self.model, dev, frozen, forward, point_loss)))
            self.device = (f"{self.device}, process {torch.distributed.get_rank()} of "
                           f"{torch.distributed.get_world_size()}")
        with arithmetic(self.precision):
            self.runner = make_runner(self.loop, self.model, self.x, self.y, settings, n,
                                      **shared)
        self.compile_s = self.runner.warmup_s
        if optimizer:
            if self.runner.opt is None:
                raise UsageError(f"--resume: optimizer state has {len(optimizer)} tensors, "
                                 f"expected none (plain SGD, --loop {self.loop})")
            try:
                optim.load(self.runner.opt, self.names, optimizer, dev)
            except (KeyError, ValueError, RuntimeError) as e:
                raise UsageError(f"--resume: optimizer state does not fit --optimizer "
                                 f"{settings.optimizer} ({e})") from None
        self.sizes = batch_sizes(n, None if settings.full_batch(n) else settings.batch_size)
        length = chunk_length(settings.epochs, settings.chunk_epochs, settings.checkpoint_every)
        self.losses = torch.empty(length, dtype=DTYPES[settings.dtype], device=dev)

    def _epoch(self, order: np.ndarray, e: int, check=None) -> torch.Tensor:
        """Epoch e of a mini-batch run: the points in `order`, batch by batch, one update
        each; returns the point-weighted mean of the batches' losses. check(b, loss), if
        given, is called after every update (a replay's)."""
        idx = torch.from_numpy(np.asarray(order, np.int64)).to(self._dev)
        xe, ye = self.x.index_select(0, idx), self.y.index_select(0, idx)  # gathered once
        t = e * len(self.sizes)
        if check is None and self.runner.batches is not None:
            values = self.runner.batches(xe, ye, t)  # summed below as every loop's are
            return over_batches(self.sizes, lambda start, size, b: values[b])
        return over_batches(self.sizes, lambda start, size, b: self.runner.step(
            xe[start:start + size], ye[start:start + size], t + b), check)

    def _chunk(self, start: int, count: int, orders) -> None:
        if orders is None:
            self.runner.run(count, self.losses, start)
        else:
            for i in range(count):
                self.losses[i] = self._epoch(orders[i], start + i)

    def launch(self, start: int, count: int, orders=None):
        # what a replay of a chunk that went bad starts from: weights and optimiser state
        before = ([p.detach().clone() for p in self.params],
                  None if self.runner.opt is None else
                  copy.deepcopy(self.runner.opt.state_dict()))
        with arithmetic(self.precision):
            self._chunk(start, count, orders)  # losses stay on the device until read
            held = None if self.held is None else self._predict(*self.held)[2]
        return start, count, orders, before, held

    def _predict(self, x, y):
        """(mu, var, loss) of the current weights on x, y, on the device."""
        s = self.settings
        with torch.no_grad():
            mu, var = self.model(x)
            return mu, var, training_loss(s.loss, mu, var, y, s.full, s.beta)

    def read(self, handle) -> Chunk:
        start, count, orders, before, held = handle
        # A copy: on a CPU .numpy() shares the losses' memory, which a replay writes again.
        chunk = Chunk.from_losses(start, self.losses[:count].cpu().numpy().copy())
        if held is not None:
            chunk = dataclasses.replace(chunk, held_out_loss=float(held))
        if chunk.failed is None and _finite(self.params):
            return chunk
        return self._replay(start, count, orders, before, chunk)

    def _replay(self, start, count, orders, before, chunk) -> Chunk:
        """Replay the chunk update by update (the loops are deterministic) to name what
        failed first: a non-finite loss, or an update that made the weights non-finite
        while its loss was finite (the next loss is then nan)."""
        params, opt_state = before
        with torch.no_grad():
            for p, b in zip(self.params, params):
                p.copy_(b)
        if opt_state is not None:
            self.runner.opt.load_state_dict(opt_state)

        class Failed(Exception):
            def __init__(self, batch, update):
                self.batch, self.update = batch, update

        def check(b, value):
            if not torch.isfinite(value):
                raise Failed(b, False)
            if not _finite(self.params):
                raise Failed(b, True)

        with arithmetic(self.precision):
            for i in range(count):
                try:
                    if orders is None:
                        self.runner.run(1, self.losses, start + i)
                        check(0, self.losses[0])
                    else:
                        self._epoch(orders[i], start + i, check)
                except Failed as f:
                    return Chunk(chunk.losses, start + i, f.update, f.batch)
        # the replay stayed finite (a nondeterministic device): the weights were non-finite
        # by the chunk's end, which is all that is known
        return Chunk(chunk.losses, start + count - 1, True, len(self.sizes) - 1)

    def state(self):
        return to_state_dict(self.model), optim.state(self.runner.opt, self.names)

    def wait(self) -> None:
        sync(self._dev)

    def finish(self) -> Final:
        # The loop's own buffers (no-autograd keeps depth + 1 (N, width) blocks, CUDA graphs
        # a pool) go before the final forward pass allocates its own: not both at the peak.
        self.runner = None
        with arithmetic(self.precision):
            mu, var, value = self._predict(self.x, self.y)
            held = None
            if self.held is not None:
                hm, hv, hl = self._predict(*self.held)
                held = Prediction(hm[:, 0].cpu().numpy(), hv[:, 0].cpu().numpy(), float(hl))
        return Final(to_state_dict(self.model), mu[:, 0].cpu().numpy(),
                     var[:, 0].cpu().numpy(), float(value), held)
