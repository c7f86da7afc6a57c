"""The `compile-update` loop: whole updates, several batches at a time, as one compiled graph.

On a CPU a mini-batch update of a small network is a few hundred microseconds of matrix
products and as much again of everything else: autograd's engine walking its graph, the
optimiser's Python, a dozen small kernels each with its own dispatch and thread start. An
epoch of 20,000 points in batches of 250 is 80 of them (docs/performance.md). Here the
gradient comes from torch.func (`grad_and_value` of the loss through `functional_call`:
autograd's own rules, traced instead of replayed) and the update from torch.optim's
functional step (`torch.optim.adam.adam`, `torch.optim.sgd.sgd`: the same code the
optimiser classes run), and `torch.compile` traces `CALL_BATCHES` consecutive updates into
one graph (`fullgraph=True`): Inductor fuses each update's element-wise work into a few
C++ loops around the products, and Python runs once per call, not once per kernel.

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
  call taking the next CALL_BATCHES consecutive batches, the rest of them (and a shorter
  last batch) one a call: three graphs at most, compiled during warm-up. A full-batch run
  groups its epochs so.

It rounds as torch's multi-tensor (foreach) optimiser steps do, which is not the fused
step of the `optim` loop: the same run to rounding (tests/test_loops.py). It does not
rematerialise, shard over devices, or train ensembles (their loops do).

CALL_BATCHES trades compile time for speed: measured on the 2-core CPU (20,000 points,
width 128, batches of 250, Adam), one update a call ran an epoch in about 1.7x the matmul
floor, four in about 1.5x, against 2.5-3x for autograd with the fused step, and a cold
compile took about 9 s for one update a graph and 21 s for four (Inductor caches compiled
graphs on disk, so a second run compiles in seconds).
"""

from __future__ import annotations

import time
import torch

from hetcore.schedule import batch_sizes, chunk_length
from hetcore.settings import Settings
from torchhet import optim
from torchhet.model import training_loss

CALL_BATCHES = 4  # updates traced into one graph (see the module docstring)
# Inductor's C++ kernels start an OpenMP team for every loop; for a batch's blocks of a
# few thousand elements that start costs more than the loop itself. Below this many
# elements in a batch's (rows, width) block the graph's own loops run on one thread (MKL's
# products keep theirs).
ONE_THREAD_BELOW = 1 << 16


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


def make(model, x: torch.Tensor, y: torch.Tensor, settings: Settings, n_points: int):
    """(run, step, opt, warmup_s) for torchhet.engine.Runner, and `batches`:
    batches(xe, ye, t) makes one epoch's updates on the gathered points xe, ye from update
    t and returns their losses (a device tensor, one a batch)."""
    from torch.func import functional_call, grad_and_value
    from torch.optim.adam import adam
    from torch.optim.sgd import sgd

    device = x.device
    loss, beta, full, kind = settings.loss, settings.beta, settings.full, settings.optimizer
    named = dict(model.named_parameters())
    # An MSE run's variance head has no gradient: not updated, no state (torch.optim's rule)
    trained = [n for n in named if not (loss == "mse" and n.startswith("var_head."))]
    fixed = [n for n in named if n not in trained]
    # Detached views: the same memory as the parameters, updated in place, plain tensors to
    # the compiler (as the warm-up's copies are)
    tp = [named[n].detach() for n in trained]
    fp = [named[n].detach() for n in fixed]
    opt = optim.make(settings, [named[n] for n in trained], device)
    group = opt.param_groups[0]
    momentum = group.get("momentum", 0.0)

    def value(ps, qs, xb, yb):
        weights = {**dict(zip(trained, ps)), **dict(zip(fixed, qs))}
        mu, var = functional_call(model, weights, (xb,))
        return training_loss(loss, mu, var, yb, full, beta)

    grad_value = grad_and_value(value)

    def updates(ps, qs, state, xs, ys, lrs, size: int, count: int, same: bool):
        out = []
        for i in range(count):
            xb, yb = (xs, ys) if same else (xs[i * size:(i + 1) * size],
                                            ys[i * size:(i + 1) * size])
            grads, v = grad_value(ps, qs, xb, yb)
            if kind == "sgd":
                sgd(ps, list(grads), state[0] if state else [None] * len(ps), foreach=True,
                    weight_decay=0.0, momentum=momentum, lr=lrs[i], dampening=0.0,
                    nesterov=bool(group["nesterov"]), maximize=False)
            else:
                adam(ps, list(grads), *state[:2], [], state[2], foreach=True,
                     capturable=True, decoupled_weight_decay=kind == "adamw", amsgrad=False,
                     beta1=group["betas"][0], beta2=group["betas"][1], lr=lrs[i],
                     weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
            out.append(v)
        return torch.stack(out)

    full_batch = settings.full_batch(n_points)
    sizes = batch_sizes(n_points, None if full_batch else settings.batch_size)
    options = {"cpp.threads": 1} if device.type == "cpu" and \
        sizes[0] * settings.width < ONE_THREAD_BELOW else {}
    compiled = torch.compile(updates, fullgraph=True, dynamic=False, options=options)
    schedule = optim.Schedule(settings, n_points)
    lr_dtype = x.dtype

    def call(xs, ys, t: int, size: int, count: int, same: bool, ps=tp, state=None):
        lrs = torch.tensor([schedule(t + i) for i in range(count)], dtype=lr_dtype,
                           device=device)
        with torch.no_grad():
            return compiled(ps, fp, _state(opt, kind, momentum) if state is None else
                            state, xs, ys, lrs, size, count, same)

    def plan(count: int) -> list[int]:
        """Calls covering `count` updates: of CALL_BATCHES, the rest one by one (two graphs
        at most, whatever the chunk lengths)."""
        return [CALL_BATCHES] * (count // CALL_BATCHES) + [1] * (count % CALL_BATCHES)

    whole, last = sizes[0], sizes[-1]
    n_whole = len(sizes) - (last != whole)

    def batches(xe, ye, t: int) -> torch.Tensor:
        out, start, b = [], 0, 0
        for count in plan(n_whole):
            out.append(call(xe[start:start + count * whole], ye[start:start + count * whole],
                            t + b, whole, count, False))
            start, b = start + count * whole, b + count
        if last != whole:
            out.append(call(xe[start:], ye[start:], t + b, last, 1, False))
        return torch.cat(out) if len(out) > 1 else out[0]

    def run(count: int, losses: torch.Tensor, start: int) -> None:  # full batches
        i = 0
        for k in plan(count):
            losses[i:i + k] = call(x, y, start + i, n_points, k, True)
            i += k

    def step(xb, yb, t: int) -> torch.Tensor:  # one update (a replay's)
        return call(xb, yb, t, xb.shape[0], 1, full_batch)[0]

    # Warm-up: compile every graph the run will call, on copies of the weights and state
    t0 = time.perf_counter()
    ps = [p.clone() for p in tp]
    state = [[s.clone() for s in part] for part in _state(opt, kind, momentum)]
    longest = chunk_length(settings.epochs, settings.chunk_epochs, settings.checkpoint_every)
    shapes = ({(n_points, k, True) for k in set(plan(longest)) | {1}} if full_batch else
              {(whole, k, False) for k in plan(n_whole)} | ({(last, 1, False)}
                                                            if last != whole else set()))
    for size, k, same in sorted(shapes):
        rows = size if same else size * k
        call(x[:rows], y[:rows], 0, size, k, same, ps=ps, state=state)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return run, step, opt, time.perf_counter() - t0, batches

