"""What the benchmark measures inside JAX (hetcore.backend.Measure); mirrors
torchhet/measure.py. Devices are named as --device names them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from hetcore.backend import EngineOptions
from hetcore.settings import Settings
from hetcore.timing import timed
from jaxhet.device import enable_x64, resolve_device, x64_tracing
from jaxhet.engine import JaxEngine, _step, loss_fn
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


def floor_seconds(n: int, width: int, depth: int, dtype: str, device: str, repeats: int = 5
                  ) -> list[float]:
    """One epoch's own matrix products back to back, nothing else (the matmul floor): per
    block the forward product, the weight gradient and (but for the first block) the input
    gradient; the heads' products likewise."""
    enable_x64(dtype)
    dev = resolve_device(device)
    rng = np.random.default_rng(0)

    def r(*shape):
        return jax.device_put(rng.standard_normal(shape).astype(dtype), dev)

    x, gh = r(n, 1), r(n, 2)  # gh: the loss's gradient at the two heads' outputs
    ws = [r(1, width)] + [r(width, width) for _ in range(depth - 1)]
    heads = r(width, 2)  # mean and variance heads side by side
    dot = lambda a, b: jnp.dot(a, b, precision=PRECISION)  # noqa: E731

    @jax.jit
    def once(x, ws, heads, gh):
        hs, h = [], x
        for w in ws:
            h = dot(h, w)  # (n, width)
            hs.append(h)
        outs = [dot(h, heads), dot(h.T, gh)]  # heads: forward, weight gradient
        dh = dot(gh, heads.T)  # heads: input gradient (n, width)
        for k in range(depth - 1, -1, -1):
            inp = x if k == 0 else hs[k - 1]
            outs.append(dot(inp.T, dh))  # weight gradient (in, width)
            if k > 0:
                dh = dot(dh, ws[k].T)  # input gradient (n, width)
        return outs

    return timed(lambda: once(x, ws, heads, gh), _sync, repeats)


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
    _, vjp = jax.vjp(lambda p: loss_fn(p, graphdef, x, y, settings.full, settings.remat,
                                       settings.loss, beta), params)

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
