"""Training loops, each a way to run the same SGD epoch; mirrors jaxhet/loops.py.

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

Each presents the same runner: `runner(n, losses)` runs n epochs and writes their losses
into the device tensor `losses[:n]`; nothing is read back to the host. Warm-up (compiling,
capturing) happens in `make_runner`, is timed there, and leaves the weights as they were:
the first epoch the runner runs is the run's epoch 0, from the initial weights.

`remat=True` checkpoints the trunk in about sqrt(depth) segments (torch.utils.checkpoint,
non-reentrant): the backward pass recomputes a segment's activations instead of keeping
them; less memory, one more trunk forward.
"""

from __future__ import annotations

import time

import torch

from hetcore.errors import UsageError
from hetcore.results import remat_segments
from hetcore.settings import LOOPS as ALL_LOOPS
from torchhet import handgrad
from torchhet.model import gaussian_nll

LOOPS = ALL_LOOPS["torch"]  # named once, in hetcore.settings
CUDA_ONLY = ("cudagraph", "reduce-overhead")
WARMUP_STEPS = 3  # CUDA graph capture wants a few steps on a side stream first

# Chosen from scripts/bench.py's figures (README, Performance). CPU: `no-autograd` needs no
# warm-up and runs an epoch 10-15% faster than `eager` (interleaved in one process, so
# that the machine's drift cancels), as fast as `compile` within this machine's noise,
# whose Inductor needs ~5 s (warm cache) to ~20 s (cold) before its first epoch: it
# finishes first at every length. `optim` pays ~1.5 s on its first use (torch.optim
# imports torch._dynamo) for no per-epoch gain at 8 parameters. CUDA (chosen by reasoning,
# not measured here): an epoch is a few dozen tiny kernels, so launch overhead dominates,
# and one graph replay per epoch, captured in milliseconds, finishes first.


def default_loop(device_type: str, epochs: int | None = None, remat: bool = False) -> str:
    """The loop that finishes a run of `epochs` soonest, warm-up included, on this device
    type (the same at every length on the devices measured; `epochs` mirrors jaxhet);
    with `remat`, the soonest of those that rematerialise."""
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
        _sync(device)
        _restore(model, saved)
        for p in params:
            p.grad = None

    else:  # cudagraph
        step = _capture(model, params, x, y, lr, full, remat)

    _sync(device)
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


# ---- measurement helpers for scripts/bench.py (hetcore.bench) -------------------------

def matmul_seconds(size: int, dtype: torch.dtype, device: torch.device, repeats: int = 5
                   ) -> list[float]:
    """Seconds of each of `repeats` (size x size) @ (size x size) products, after warm-up."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    out = torch.empty(size, size, dtype=dtype, device=device)
    torch.mm(a, b, out=out)
    _sync(device)
    t = time.perf_counter()
    torch.mm(a, b, out=out)
    _sync(device)
    inner = _inner(time.perf_counter() - t)
    return _timed(lambda: torch.mm(a, b, out=out), device, inner, repeats)


def _inner(once_s: float, target_s: float = 0.05) -> int:
    """Calls per timed sample so that a sample lasts about `target_s` (short products are
    otherwise timed as much by the clock and the dispatch as by the work)."""
    return int(min(1000, max(1, target_s / max(once_s, 1e-7))))


def _timed(fn, device, inner: int, repeats: int) -> list[float]:
    for _ in range(2):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        _sync(device)
        times.append((time.perf_counter() - t) / inner)
    return times


def floor_seconds(n: int, width: int, depth: int, dtype: torch.dtype, device: torch.device,
                  repeats: int = 5) -> list[float]:
    """One epoch's own matrix products, back to back and nothing else (the matmul floor):
    per block the forward product, the weight gradient and (but for the first block) the
    input gradient, in the layouts the epoch uses; the heads' products likewise."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).to(device)

    x = r(n, 1)
    hs = [r(n, width) for _ in range(depth)]
    ws = [r(width, 1)] + [r(width, width) for _ in range(depth - 1)]
    heads = r(2, width)  # mean and variance heads stacked
    gh = r(n, 2)  # the loss's gradient at the two heads' outputs

    def once():
        h = x
        for w, out in zip(ws, hs):
            torch.mm(h, w.t(), out=out)  # (n, width)
            h = out
        outs = [h @ heads.t(), gh.t() @ h]  # heads: forward, weight gradient
        dh = gh @ heads  # heads: input gradient (n, width)
        for k in range(depth - 1, -1, -1):
            inp = x if k == 0 else hs[k - 1]
            outs.append(dh.t() @ inp)  # weight gradient (width, in)
            if k > 0:
                dh = dh @ ws[k]  # input gradient (n, width)
        return outs

    once()
    _sync(device)
    t = time.perf_counter()
    once()
    _sync(device)
    return _timed(once, device, _inner(time.perf_counter() - t), repeats)


def activation_bytes(model, x, y, full: bool, remat: bool = False, loop: str = "eager") -> int:
    """Bytes that the backward pass of one epoch keeps: autograd's saved tensors (distinct
    storages, parameters and inputs excluded), or `no-autograd`'s own buffers."""
    if loop == "no-autograd":
        return handgrad.activation_bytes(model, x)
    own = {p.untyped_storage().data_ptr() for p in model.parameters()}
    own |= {x.untyped_storage().data_ptr(), y.untyped_storage().data_ptr()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward_loss(model, x, y, full, remat)
    total = sum(seen.values())
    del loss
    model.zero_grad(set_to_none=True)
    return total


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int | None:
    """The caching allocator's peak since reset_peak (CUDA); None where there is none."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None
