"""The `compile-update` loop: whole updates, several batches at a time, as one compiled graph.

On a CPU a mini-batch update of a small network is a few hundred microseconds of matrix
products and as much again of everything else: autograd's engine walking its graph, the
optimiser's Python, a dozen small kernels each with its own dispatch and thread start. An
epoch of 20,000 points in batches of 250 is 80 of them (docs/performance.md). Here the
gradient comes from torch.func (`grad_and_value` of the loss through
torchhet.model.lean_forward, the model's forward with its narrow products written as
element-wise work and its two heads as sums over the width: three products an update
instead of eleven; autograd's own rules, traced instead of replayed) and the update from torch.optim's
functional step (`torch.optim.adam.adam`, `torch.optim.sgd.sgd`: the same code the
optimiser classes run), and `torch.compile` traces several consecutive updates into one
graph (`fullgraph=True`): Inductor fuses each update's element-wise work into a few C++
loops around the products, and on a CPU its C++ wrapper (`cpp_wrapper`) calls them, so that
no Python runs between the kernels of a call.

What it keeps from the other loops:
- the laws: torch.optim's own optimiser step (SGD with momentum and Nesterov, Adam,
  AdamW), the learning rate of each update from torchhet.optim.Schedule, passed in as a
  tensor so that a schedule does not recompile;
- the state: the torch.optim optimiser of the `optim` loop holds it (`exp_avg`,
  `exp_avg_sq`, `step`; `momentum_buffer`), so checkpoints, resume and replays are the
  other loops'. Its momentum buffers start at zero, where torch.optim starts them at the
  first gradient: `0 * momentum + g` is `g` exactly, the same law and the same bits. Adam's
  step counts are held in the weights' dtype and on their device (torch.optim's are float32
  on the CPU), so that a float64 run's bias corrections are float64 and a CUDA run's step
  is the capturable one's;
- the batches and their order: the epoch's points gathered once in the driver's order, a
  call taking the next CALL_BATCHES consecutive batches, the rest of them one call, and a
  shorter last batch one: three graphs at most, the same every epoch, compiled during
  warm-up. A full-batch run takes CALL_EPOCHS epochs a call and the rest of a chunk one by
  one (chunks differ in length; two graphs whatever their lengths).

It rounds as torch's multi-tensor (foreach) optimiser steps do, which is not the fused
step of the `optim` loop: the same run to rounding (float64 to 1e-10 against the laws'
reference, tests/test_recipes.py; tests/test_loops.py). It does not rematerialise or shard
over devices. An ensemble (torchhet/ensemble.py) compiles its members' vmapped update
through the same `Updates`.

Updates a call trade compile time for speed: more of them spare the call's own overhead
(Dynamo's cache lookup and guards, the wrapper's prologue, the copies of the state back
into its tensors: about 0.1 ms a call on a CPU), and lengthen the tracing, which Inductor's
cache on disk does not spare (it keeps the C++). A mini-batch update of a small model is
about 0.2 ms, so the overhead decides: sixteen a call, as measured (docs/performance.md,
2026-12-03). A full-batch epoch is longer, and its chunks differ: four.

Once a call has been compiled in warm-up, its later calls evaluate only the guards that
tell Dynamo's compiled graphs apart (`torch.compiler.set_stance(skip_guard_eval_unsafe=
True)`): every tensor's shape, strides and dtype still, and whatever guard once failed;
the integer arguments (how many updates, of which size) are such guards only after a
compile has seen them differ, and under that stance torch refuses to compile, so a call
whose arguments warm-up did not compile runs with every guard (a replay's single update, a
resumed run's new chunk length; tests/test_loops.py).
"""

from __future__ import annotations

import contextlib
import time

import torch

from hetcore.schedule import batch_sizes, chunk_length
from hetcore.settings import Settings
from torchhet import optim
from torchhet.model import lean_forward, training_loss

CALL_BATCHES = 16  # mini-batch updates traced into one graph (see the module docstring)
CALL_EPOCHS = 4  # full-batch epochs traced into one graph
# Inductor's C++ kernels start an OpenMP team for every loop; for a batch's blocks of a
# few thousand elements that start costs more than the loop itself. Below this many
# elements in a batch's (rows, width) block the graph's own loops run on one thread (MKL's
# products keep theirs).
ONE_THREAD_BELOW = 1 << 16


def allow_recompiles(limit: int = 256) -> None:
    """Every runner compiles the same code for a new model (new guards), and Dynamo counts
    them per code object, whichever model they were for: past its default limit of 8 it
    would fall back to eager (or, with fullgraph=True, fail). Raise the limit."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(limit, getattr(torch._dynamo.config, name)))


def supports(settings: Settings) -> str | None:
    """Why compile-update cannot run these settings, or None."""
    if settings.devices > 1:
        return "trains on one device"
    if settings.remat:
        return "does not rematerialise"
    return None


def _state(opt: torch.optim.Optimizer, kind: str, momentum: float) -> list[list[torch.Tensor]]:
    """The optimiser state of `params` as lists for the functional step, created where it
    is missing (zeros, as torch.optim's first step would leave them; see the module
    docstring) and read from the optimiser every call, so that a state loaded into it (a
    resumed run, a replayed chunk) is the one used."""
    params = opt.param_groups[0]["params"]
    if kind == "sgd":
        if not momentum:
            return []
        bufs = []
        for p in params:
            entry = opt.state[p]
            if entry.get("momentum_buffer") is None:
                entry["momentum_buffer"] = torch.zeros_like(p.detach())
            bufs.append(entry["momentum_buffer"])
        return [bufs]
    avgs, sqs, steps = [], [], []
    for p in params:
        entry = opt.state[p]
        if "exp_avg" not in entry:
            entry.update(step=torch.zeros((), dtype=p.dtype, device=p.device),
                         exp_avg=torch.zeros_like(p.detach()),
                         exp_avg_sq=torch.zeros_like(p.detach()))
        elif entry["step"].dtype != p.dtype or entry["step"].device != p.device:
            # as torch.optim loads it: float32, on the CPU; the capturable step wants it
            # beside the weights
            entry["step"] = entry["step"].to(p.device, p.dtype)
        avgs.append(entry["exp_avg"])
        sqs.append(entry["exp_avg_sq"])
        steps.append(entry["step"])
    return [avgs, sqs, steps]


def plan(count: int, full_batch: bool) -> list[int]:
    """Calls covering `count` updates. Full batches (a chunk's epochs, whose count varies
    from chunk to chunk): of CALL_EPOCHS, the rest one by one, two graphs whatever the
    chunk lengths. Mini-batches (an epoch's whole batches, the same count every epoch):
    of CALL_BATCHES, the rest one call."""
    per_call = CALL_EPOCHS if full_batch else CALL_BATCHES
    whole, rest = divmod(count, per_call)
    return [per_call] * whole + ([1] * rest if full_batch else [rest] if rest else [])


class Updates:
    """`count` consecutive updates as one compiled call.

    value(ps, qs, xb, yb, same) -> (the scalar to differentiate, the losses to report): ps
    the trained tensors, qs the fixed ones (an MSE run's variance head), `same` whether
    every update sees the whole of xs, ys (full batches) or the next `size` rows along
    `dim` (batches, gathered in the epoch's order). The trained tensors are updated in
    place by torch.optim's functional step for `opt` (whose state it keeps)."""

    def __init__(self, value, trained: list, fixed: list, opt: torch.optim.Optimizer,
                 settings: Settings, n_points: int, rows: int, dim: int = 0):
        from torch.func import grad_and_value
        from torch.optim.adam import adam
        from torch.optim.sgd import sgd

        kind, group = settings.optimizer, opt.param_groups[0]
        momentum = group.get("momentum", 0.0)
        grad_value = grad_and_value(value, has_aux=True)

        def updates(ps, qs, state, xs, ys, lrs, size: int, count: int, same: bool):
            out = []
            for i in range(count):
                xb, yb = (xs, ys) if same else (xs.narrow(dim, i * size, size),
                                                ys.narrow(dim, i * size, size))
                grads, (_, v) = grad_value(ps, qs, xb, yb, same)
                if kind == "sgd":
                    sgd(ps, list(grads), state[0] if state else [None] * len(ps),
                        foreach=True, weight_decay=0.0, momentum=momentum, lr=lrs[i],
                        dampening=0.0, nesterov=bool(group["nesterov"]), maximize=False)
                else:
                    adam(ps, list(grads), *state[:2], [], state[2], foreach=True,
                         capturable=True, decoupled_weight_decay=kind == "adamw",
                         amsgrad=False, beta1=group["betas"][0], beta2=group["betas"][1],
                         lr=lrs[i], weight_decay=group["weight_decay"], eps=group["eps"],
                         maximize=False)
                out.append(v)
            return torch.stack(out)

        self.device = trained[0].device
        allow_recompiles()
        options = {}
        if self.device.type == "cpu":
            # C++ calls the graph's kernels: a Python wrapper spent about 30 us an update
            # of the mini-batch workload allocating and calling (docs/performance.md)
            options["cpp_wrapper"] = True
            if rows * settings.width < ONE_THREAD_BELOW:
                options["cpp.threads"] = 1
        self.compiled = torch.compile(updates, fullgraph=True, dynamic=False,
                                      options=options)
        self.warmed: set[tuple] = set()  # the calls warm-up compiled (see _key)
        self.trained, self.fixed, self.opt = trained, fixed, opt
        self.kind, self.momentum = kind, momentum
        self.schedule = optim.Schedule(settings, n_points)
        self.dtype = trained[0].dtype

    def __call__(self, xs, ys, t: int, size: int, count: int, same: bool, ps=None,
                 state=None) -> torch.Tensor:
        """Updates t .. t + count - 1; their losses, (count, ...) on the device."""
        lrs = torch.tensor([self.schedule(t + i) for i in range(count)], dtype=self.dtype,
                           device=self.device)
        # The weights and state warm-up compiled on were copies of the same shapes; a call
        # it did not compile is checked in full (see the module docstring)
        seen = ps is None and _key(xs, ys, size, count, same) in self.warmed
        stance = torch.compiler.set_stance("default", skip_guard_eval_unsafe=True) \
            if seen else contextlib.nullcontext()
        with torch.no_grad(), stance:
            return self.compiled(
                self.trained if ps is None else ps, self.fixed,
                _state(self.opt, self.kind, self.momentum) if state is None else state,
                xs, ys, lrs, size, count, same)

    def warm(self, calls) -> float:
        """Compile each call (xs, ys, size, count, same) on copies of the weights and state,
        which stay as they were; returns the seconds it took."""
        t0 = time.perf_counter()
        ps = [p.clone() for p in self.trained]
        state = [[s.clone() for s in part]
                 for part in _state(self.opt, self.kind, self.momentum)]
        for xs, ys, size, count, same in calls:
            self(xs, ys, 0, size, count, same, ps=ps, state=state)
            self.warmed.add(_key(xs, ys, size, count, same))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0


def _key(xs, ys, size: int, count: int, same: bool) -> tuple:
    """What tells one call of an Updates from another: its integer arguments and its
    batches' layout, and whether they are one tensor (Dynamo compiles a graph that reads
    both from one input then; the weights and state are the same tensors every call)."""
    return (size, count, same, xs.shape, xs.stride(), ys.shape, ys.stride(), xs.dtype,
            xs is ys)


def split(named: dict, loss: str) -> tuple[list[str], list[str]]:
    """(trained, fixed) parameter names: an MSE run's variance head has no gradient, so it
    is not updated and has no state (torch.optim's rule)."""
    trained = [n for n in named if not (loss == "mse" and n.startswith("var_head."))]
    return trained, [n for n in named if n not in trained]


def make(model, x: torch.Tensor, y: torch.Tensor, settings: Settings, n_points: int):
    """(run, step, opt, warmup_s) for torchhet.engine.Runner, and `batches`:
    batches(xe, ye, t) makes one epoch's updates on the gathered points xe, ye from update
    t and returns their losses (a device tensor, one a batch)."""
    loss, beta, full = settings.loss, settings.beta, settings.full
    named = dict(model.named_parameters())
    trained, fixed = split(named, loss)
    opt = optim.make(settings, [named[n] for n in trained], x.device)

    def value(ps, qs, xb, yb, same):
        weights = {**dict(zip(trained, ps)), **dict(zip(fixed, qs))}
        mu, var = lean_forward(weights, xb)
        v = training_loss(loss, mu, var, yb, full, beta)
        return v, v

    full_batch = settings.full_batch(n_points)
    sizes = batch_sizes(n_points, None if full_batch else settings.batch_size)
    # Detached views: the same memory as the parameters, updated in place, plain tensors to
    # the compiler (as the warm-up's copies are)
    call = Updates(value, [named[n].detach() for n in trained],
                   [named[n].detach() for n in fixed], opt, settings, n_points, sizes[0])

    def run(count: int, losses: torch.Tensor, start: int) -> None:  # full batches
        full_batches(call, x, y, start, count, losses)

    def step(xb, yb, t: int) -> torch.Tensor:  # one update (a replay's)
        return call(xb, yb, t, xb.shape[0], 1, full_batch)[0]

    warmup_s = call.warm(warm_calls(x, y, settings, sizes))
    return run, step, opt, warmup_s, lambda xe, ye, t: through_batches(call, xe, ye, t, sizes)


def full_batches(call: Updates, x, y, start: int, count: int, losses: torch.Tensor) -> None:
    """Epochs start .. start + count - 1 of a full-batch run, their losses into losses[:count]."""
    i = 0
    for k in plan(count, True):
        losses[i:i + k] = call(x, y, start + i, x.shape[0], k, True)
        i += k


def through_batches(call: Updates, xe, ye, t: int, sizes: list[int], dim: int = 0):
    """One epoch's updates from update t on the points gathered in its order (xe, ye, the
    points along `dim`), in batches of `sizes`: their losses, one row a batch."""
    whole, last = sizes[0], sizes[-1]
    n_whole = len(sizes) - (last != whole)
    out, start, b = [], 0, 0
    for count in plan(n_whole, False):
        out.append(call(xe.narrow(dim, start, count * whole), ye.narrow(dim, start, count * whole),
                        t + b, whole, count, False))
        start, b = start + count * whole, b + count
    if last != whole:
        out.append(call(xe.narrow(dim, start, last), ye.narrow(dim, start, last), t + b, last,
                        1, False))
    return torch.cat(out) if len(out) > 1 else out[0]


def warm_calls(x, y, settings: Settings, sizes: list[int], dim: int = 0) -> list[tuple]:
    """The calls (xs, ys, size, count, same) a run makes, one of each graph: for full
    batches a call of CALL_EPOCHS epochs if a chunk is that long and one of one; for
    mini-batches CALL_BATCHES batches, the rest of the whole ones, and the shorter last
    one."""
    whole, last = sizes[0], sizes[-1]
    if len(sizes) == 1:
        longest = chunk_length(settings.epochs, settings.chunk_epochs,
                               settings.checkpoint_every)
        return [(x, y, whole, k, True) for k in sorted(set(plan(longest, True)) | {1})]
    n_whole = len(sizes) - (last != whole)
    calls = [(x.narrow(dim, 0, whole * k), y.narrow(dim, 0, whole * k), whole, k, False)
             for k in sorted(set(plan(n_whole, False)))]
    if last != whole:
        calls.append((x.narrow(dim, 0, last), y.narrow(dim, 0, last), last, 1, False))
    return calls
