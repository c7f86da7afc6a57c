"""Training loops, each a way to run the same SGD epoch; mirrors torchhet/loops.py.

- `scan`: a chunk of epochs is one compiled `lax.scan` (the default: one dispatch and one
  host sync per chunk, weights donated so XLA updates them in place);
- `step`: one jit-compiled epoch per Python call, for comparison.

Both present the same runner: `runner(carry, n, start) -> (carry, losses, failed)` for
the n epochs from epoch `start` on; `losses` and `failed` are device arrays whose first `n`
entries are the chunk's losses and, after each epoch, the carry's `failed`; nothing is read
back to the host. The carry is (params, opt_state, failed), `failed` the int32 index of the
first epoch whose loss or update was not finite (-1 while there is none; `new_carry`); the
copies in the output survive the carry's donation to the next chunk.

`remat=True` checkpoints the trunk in about sqrt(depth) segments (`jax.checkpoint`,
nothing saved inside a segment): the backward pass recomputes a segment's activations
instead of keeping them; less memory, one more trunk forward. The measurement helpers at
the end serve scripts/bench.py (hetcore.bench).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from hetcore.results import remat_segments
from hetcore.settings import LOOPS as ALL_LOOPS
from jaxhet.model import PRECISION, gaussian_nll

LOOPS = ALL_LOOPS["jax"]  # named once, in hetcore.settings

# Scan iterations unrolled into one loop body. An epoch is ~4 ms of matrix products on a
# CPU against ~1 us of while-loop bookkeeping: `scripts/bench.py --unroll 4` was within the
# noise of 1 on the project's CPU (README, Performance) and doubled compile time. On a GPU
# (~30 us epochs, not measured here) unrolling could let XLA overlap epochs' kernels and
# pay the loop's per-iteration bookkeeping once per several epochs: scripts/gpu_bench.sh
# times `--unroll 1,10` in one benchmark run, to settle it there.
UNROLL = 1

# Chosen from scripts/bench.py's figures (README, Performance): `scan` and `step` compile
# in about the same time (~1 s), and the whole chunk as one program is at least as fast as
# a Python-driven step on a CPU; on a GPU (reasoned, not measured here) it also removes the
# per-epoch dispatch (~10-20 us) that would dominate the lecture's ~30 us epoch.
def default_loop(platform: str, epochs: int | None = None) -> str:
    """The loop that finishes a run soonest, compile time included, on this platform."""
    return "scan"


def _forward(model, x, remat: bool):
    if not remat:
        return model(x)
    mods = list(model.layers.layers)  # Linear, relu, Linear, relu, ...

    def run(h, part):
        for m in part:
            h = m(h)
        return h

    h = x
    for start, stop in remat_segments(len(mods) // 2):
        part = mods[2 * start:2 * stop]
        # Nothing inside the segment is saved: the backward pass recomputes it from `h`.
        h = jax.checkpoint(lambda h, part=part: run(h, part))(h)
    return model.heads(h)


def loss_fn(params, graphdef, x, y, full: bool, remat: bool = False):
    mu, var = _forward(nnx.merge(graphdef, params), x, remat)
    return gaussian_nll(mu, var, y, full)


def new_carry(params, opt_state, device):
    """The loops' carry at the start of a run: nothing has failed yet."""
    return (params, opt_state, jax.device_put(jnp.asarray(-1, jnp.int32), device))


def epoch(graphdef, full: bool, carry, x, y, lr, active, index, remat: bool = False):
    """Epoch `index` of SGD; `active` false (masked tail) or an earlier failure leaves the
    carry as is.

    carry = (params, opt_state, failed): `failed` becomes `index` at the first epoch whose
    loss or update is not finite; the weights stay those of the last finite step and later
    epochs do nothing, so the driver reads the failed epoch exactly (jaxhet.train).
    """
    params, opt_state, failed = carry
    ok = failed < 0
    tx = optax.sgd(lr)
    loss, grads = jax.value_and_grad(loss_fn)(params, graphdef, x, y, full, remat)
    # torch rounds three times: the gradient, `grad * lr`, then `param - that`. The barriers
    # keep XLA from folding lr into the gradient's matrix product (a GEMM's alpha) or the
    # product and the difference into one FMA, as a GPU backend may; a CPU does neither.
    grads = jax.lax.optimization_barrier(grads)
    updates, new_opt_state = tx.update(grads, opt_state, params)
    updates = jax.lax.optimization_barrier(updates)
    new_params = optax.apply_updates(params, updates)
    # A finite loss whose update makes a weight inf or nan is refused too (one reduction,
    # fused with the update).
    finite = jnp.isfinite(loss) & jnp.all(jnp.stack(
        [jnp.isfinite(leaf).all() for leaf in jax.tree.leaves(new_params)]))
    apply = ok & active & finite
    keep = lambda new, old: jnp.where(apply, new, old)  # noqa: E731
    params = jax.tree.map(keep, new_params, params)
    opt_state = jax.tree.map(keep, new_opt_state, opt_state)
    failed = jnp.where(ok & active & ~finite, jnp.asarray(index, failed.dtype), failed)
    return (params, opt_state, failed), (loss, failed)


def _scan_chunk(graphdef, length: int, full: bool, remat: bool, unroll: int, carry, x, y, lr,
                n_active, start):
    """`length` epochs from epoch `start` as one lax.scan; those from `n_active` on are
    masked."""

    def body(carry, i):
        return epoch(graphdef, full, carry, x, y, lr, i < n_active, start + i, remat)

    return jax.lax.scan(body, carry, jnp.arange(length, dtype=jnp.int32), unroll=unroll)


def _step(graphdef, full: bool, remat: bool, carry, x, y, lr, active, index):
    """One epoch; also returns the next epoch's index, so that the driver feeds the device
    its own counter back instead of sending a host scalar every epoch."""
    carry, out = epoch(graphdef, full, carry, x, y, lr, active, index, remat)
    return carry, out, index + 1


_scan_jit = jax.jit(_scan_chunk, static_argnums=(0, 1, 2, 3, 4), donate_argnums=(5,))
_step_jit = jax.jit(_step, static_argnums=(0, 1, 2), donate_argnums=(3,))

_compiled: dict = {}


def signature(tree) -> tuple:
    return tuple((leaf.shape, str(leaf.dtype)) for leaf in jax.tree.leaves(tree))


def compile_once(fn, key, *args):
    """Ahead-of-time compile, cached by what shapes the program (never by values)."""
    if key not in _compiled:
        _compiled[key] = fn.lower(*args).compile()
    return _compiled[key]


def make_runner(loop: str, graphdef, full: bool, length: int, carry, x, y, lr, device,
                remat: bool = False):
    """(runner, compile seconds) for `loop`; see the module docstring. `runner.compiled` is
    the compiled program (for its buffer plan)."""
    if loop not in LOOPS:
        raise ValueError(f"jax loop must be one of {LOOPS}, got {loop!r}")
    unroll = max(1, min(int(UNROLL), length))
    sig = signature((carry, x, y, lr))
    t0 = time.perf_counter()
    i32 = np.int32  # a strongly typed scalar: the compiled programs take int32
    if loop == "scan":
        key = ("scan", graphdef, length, full, remat, unroll, sig, device)
        chunk = compile_once(_scan_jit, key, graphdef, length, full, remat, unroll, carry, x,
                             y, lr, i32(length), i32(0))

        def runner(carry, n, start):
            carry, (losses, failed) = chunk(carry, x, y, lr, i32(n), i32(start))
            return carry, losses, failed
    else:
        on = jax.device_put(jnp.asarray(True), device)
        key = ("step", graphdef, full, remat, sig, device)
        first = jax.device_put(i32(0), device)
        step = compile_once(_step_jit, key, graphdef, full, remat, carry, x, y, lr, on, first)

        def runner(carry, n, start):
            out = []
            index = jax.device_put(i32(start), device)  # one transfer per chunk
            for _ in range(n):
                carry, loss_failed, index = step(carry, x, y, lr, on, index)
                out.append(loss_failed)
            losses, failed = (jnp.stack(v) for v in zip(*out))
            return carry, losses, failed
    runner.compiled = chunk if loop == "scan" else step
    return runner, time.perf_counter() - t0


# ---- measurement helpers for scripts/bench.py (hetcore.bench) -------------------------

def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jaxlibs: one dict per program
        cost = cost[0] if cost else {}
    return dict(cost or {})


def epoch_flops(graphdef, full: bool, carry, x, y, lr) -> float:
    """Floating-point operations of one epoch as XLA's cost analysis of the compiled step
    counts them (matrix products and element-wise work)."""
    on = jnp.asarray(True)
    compiled = jax.jit(_step, static_argnums=(0, 1, 2)).lower(
        graphdef, full, False, carry, x, y, lr, on, np.int32(0)).compile()
    return float(_cost(compiled).get("flops", float("nan")))


def memory_plan(loop: str, graphdef, full: bool, length: int, carry, x, y, lr, device,
                remat: bool = False) -> dict:
    """XLA's buffer plan of the loop's compiled program, in bytes (`peak` = arguments +
    outputs + temporaries - donated aliases: what the program holds at most)."""
    runner, _ = make_runner(loop, graphdef, full, length, carry, x, y, lr, device, remat)
    m = runner.compiled.memory_analysis()
    if m is None:
        return {}
    plan = {k: int(getattr(m, f"{k}_size_in_bytes", 0))
            for k in ("argument", "output", "alias", "temp")}
    plan["peak"] = plan["argument"] + plan["output"] + plan["temp"] - plan["alias"]
    return plan


def activation_bytes(graphdef, full: bool, params, x, y, remat: bool = False) -> int:
    """Bytes the backward pass keeps from the forward (residuals of the loss's VJP),
    parameters and data excluded."""
    _, vjp = jax.vjp(lambda p: loss_fn(p, graphdef, x, y, full, remat), params)

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


def matmul_seconds(size: int, dtype: str, device, repeats: int = 5) -> list[float]:
    """Seconds of each of `repeats` (size x size) @ (size x size) products at full
    precision, after warm-up."""
    key = jax.random.key(0)
    a = jax.device_put(jax.random.normal(key, (size, size), dtype), device)
    b = jax.device_put(jax.random.normal(jax.random.key(1), (size, size), dtype), device)

    @jax.jit
    def mm(a, b):
        return jnp.dot(a, b, precision=PRECISION)

    return _timed(lambda: mm(a, b), repeats)


def _timed(fn, repeats: int, target_s: float = 0.05) -> list[float]:
    """Seconds per call, each sample `inner` calls long (about `target_s`), after warm-up:
    short programs are otherwise timed as much by the clock as by the work."""
    jax.block_until_ready(fn())
    t = time.perf_counter()
    jax.block_until_ready(fn())
    inner = int(min(1000, max(1, target_s / max(time.perf_counter() - t, 1e-7))))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        outs = [fn() for _ in range(inner)]
        jax.block_until_ready(outs)
        times.append((time.perf_counter() - t) / inner)
    return times


def floor_seconds(n: int, width: int, depth: int, dtype: str, device, repeats: int = 5
                  ) -> list[float]:
    """One epoch's own matrix products back to back, nothing else (the matmul floor)."""
    rng = np.random.default_rng(0)

    def r(*shape):
        return jax.device_put(rng.standard_normal(shape).astype(dtype), device)

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

    return _timed(lambda: once(x, ws, heads, gh), repeats)


def peak_bytes(device) -> int | None:
    """The device allocator's peak in use (GPU, TPU); None on CPU, which keeps none."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - a backend without statistics
        return None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None
