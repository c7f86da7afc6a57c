"""What the benchmark measures inside JAX (hetcore.backend.Measure); mirrors
torchhet/measure.py. Devices are named as --device names them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from hetcore.backend import EngineOptions
from hetcore.schedule import batch_sizes
from hetcore.settings import Settings
from hetcore.timing import timed
from jaxhet.device import enable_x64, resolve_device, x64_tracing
from jaxhet import ensemble
from jaxhet.engine import (JaxEngine, _step, compile_lowered, dot_options, loss_fn,
                           paired_layers)
from jaxhet.model import PRECISION
from jaxhet.weights import put


def _sync(out) -> None:
    jax.block_until_ready(out)


def matmul_seconds(size: int, dtype: str, device: str, repeats: int = 5) -> list[float]:
    """Seconds of each of `repeats` (size x size) @ (size x size) products at full
    precision, after warm-up."""
    enable_x64(dtype)
    dev = resolve_device(device)
    a = jax.device_put(jax.random.normal(jax.random.key(0), (size, size), dtype), dev)
    b = jax.device_put(jax.random.normal(jax.random.key(1), (size, size), dtype), dev)

    @jax.jit
    def mm(a, b):
        return jnp.dot(a, b, precision=PRECISION)

    return timed(lambda: mm(a, b), _sync, repeats)


def floor_seconds(n: int, width: int, depth: int, dtype: str, device: str, repeats: int = 5,
                  batch: int | None = None, members: int = 1) -> list[float]:
    """One epoch's own matrix products back to back, nothing else (the matmul floor): for
    each of its updates (one of every point, or one a batch of `batch`, the last shorter:
    hetcore.schedule.batch_sizes), per block the forward product, the weight gradient and
    (but for the first block) the input gradient; the heads' products likewise. members >
    1: an ensemble's, every product batched over the members. The updates run as one
    program (a lax.map over the whole batches, then the shorter one). Where the run's
    program pairs its first two layers (jaxhet.engine.paired_layers), the second layer's
    weight gradient is taken as that program takes it, from the (width, rows) layout."""
    enable_x64(dtype)
    dev = resolve_device(device)
    rng = np.random.default_rng(0)
    sizes = batch_sizes(n, batch)
    lead = (members,) if members > 1 else ()
    whole = sum(1 for b in sizes if b == sizes[0])

    def r(*shape):
        return jax.device_put(rng.standard_normal(shape).astype(dtype), dev)

    def tr(a):
        return jnp.swapaxes(a, -1, -2)

    dot = lambda a, b: jnp.matmul(a, b, precision=PRECISION)  # noqa: E731

    def update(x, gh, h1t, ws, heads):  # gh: the loss's gradient at the two heads' outputs
        hs, h = [], x
        for w in ws:
            h = dot(h, w)  # (rows, width)
            hs.append(h)
        outs = [dot(h, heads), dot(tr(h), gh)]  # heads: forward, weight gradient
        dh = dot(gh, tr(heads))  # heads: input gradient (rows, width)
        for k in range(depth - 1, -1, -1):
            inp = x if k == 0 else hs[k - 1]
            # weight gradient (in, width); a paired second layer's from h1 laid out (width, rows)
            outs.append(dot(h1t if k == 1 and h1t is not None else tr(inp), dh))
            if k > 0:
                dh = dot(dh, tr(ws[k]))  # input gradient (rows, width)
        return outs

    def once(parts, tail, ws, heads):
        outs = jax.lax.map(lambda part: update(*part, ws, heads), parts)
        return outs if tail is None else (outs, update(*tail, ws, heads))

    def inputs(*outer, rows):  # a batch's x, gh, and h1 laid out (width, rows) if paired
        return (r(*outer, *lead, rows, 1), r(*outer, *lead, rows, 2),
                r(*outer, *lead, width, rows) if paired_layers(depth, False, dev) else None)

    parts = inputs(whole, rows=sizes[0])
    tail = None if len(sizes) == whole else inputs(rows=sizes[-1])
    ws = [r(*lead, 1, width)] + [r(*lead, width, width) for _ in range(depth - 1)]
    heads = r(*lead, width, 2)  # mean and variance heads side by side
    # an ensemble's products with the kernels its vmapped program is compiled with
    # and a single model's with those of its own program
    options = (ensemble.compiler_options(dtype, "vmap", dev) if members > 1
               else dot_options(dtype, width, sizes[0], dev))
    program = compile_lowered(jax.jit(once).lower(parts, tail, ws, heads), options)
    return timed(lambda: program(parts, tail, ws, heads), _sync, repeats)


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jaxlibs: one dict per program
        cost = cost[0] if cost else {}
    return dict(cost or {})


def epoch_flops(settings: Settings, x, y, weights) -> float:
    """Floating-point operations of one epoch as XLA's cost analysis of the compiled step
    counts them (matrix products and element-wise work)."""
    e = JaxEngine(settings.replace(loop="step"), x, y, weights)
    order = np.zeros(len(x), np.int32) if e.cfg.batches > 1 else None
    with x64_tracing():  # as the engine traces it
        compiled = jax.jit(_step, static_argnums=(0, 1)).lower(
            e.graphdef, e.cfg, e.carry, e.x, e.y, e.h, jnp.asarray(True), np.int32(0),
            order).compile()
    return float(_cost(compiled).get("flops", float("nan")))


def program_memory(settings: Settings, x, y, weights,
                   options: EngineOptions = EngineOptions()) -> dict:
    """XLA's buffer plan of the run's compiled chunk, in bytes (`peak` = arguments +
    outputs + temporaries - donated aliases: what the program holds at most)."""
    m = JaxEngine(settings, x, y, weights, options=options).compiled.memory_analysis()
    if m is None:
        return {}
    plan = {k: int(getattr(m, f"{k}_size_in_bytes", 0))
            for k in ("argument", "output", "alias", "temp")}
    plan["peak"] = plan["argument"] + plan["output"] + plan["temp"] - plan["alias"]
    return plan


def activation_bytes(settings: Settings, x, y, weights) -> int:
    """Bytes the backward pass keeps from the forward (residuals of the loss's VJP),
    parameters and data excluded."""
    dev = resolve_device(settings.device)
    graphdef, params = put(weights, settings.dtype, dev)
    x, y = jax.device_put(x, dev), jax.device_put(y, dev)
    beta = np.asarray(settings.beta or 0.0, settings.dtype)
    paired = paired_layers(settings.depth, settings.remat, dev)  # as the run trains
    _, vjp = jax.vjp(lambda p: loss_fn(p, graphdef, x, y, settings.full, settings.remat,
                                       settings.loss, beta, paired), params)

    def where(a):
        try:
            return a.unsafe_buffer_pointer()
        except Exception:  # noqa: BLE001 - not a single-device array
            return id(a)

    own = {where(a) for a in jax.tree.leaves((params, x, y))}
    seen = {}
    for leaf in jax.tree.leaves(vjp):
        if isinstance(leaf, jax.Array) and where(leaf) not in own:
            seen[where(leaf)] = int(leaf.nbytes)
    return sum(seen.values())


def reset_peak(device: str) -> None:
    """XLA keeps a peak since the process started and cannot reset it: nothing to do."""


def peak_bytes(device: str) -> int | None:
    """The device allocator's peak in use (GPU, TPU); None on CPU, which keeps none."""
    try:
        stats = resolve_device(device).memory_stats()
    except Exception:  # noqa: BLE001 - a backend without statistics
        return None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def release(device: str) -> None:
    """XLA frees a program's buffers when their arrays go: nothing is cached to hand back."""


def set_threads(threads: int) -> None:
    """XLA's CPU client sizes its thread pool to the cores the process may run on (its CPU
    affinity, which the benchmark sets before JAX starts): nothing more to do."""
