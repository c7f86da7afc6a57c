"""The JAX engine: a run's epochs as jit-compiled programs; mirrors torchhet/engine.py.

Loops, each a way to run the same SGD epoch:
- `scan`: a chunk of epochs is one compiled `lax.scan` (the default: one dispatch and one
  host sync per chunk, weights donated so XLA updates them in place);
- `step`: one jit-compiled epoch per Python call, for comparison.

A run is a pure function of (settings, data, initial weights): the compiled programs take
weights, data and learning rate as arguments, so new values never recompile; only the
architecture, dtype, point count, chunk length and the engine's options are compiled in.

Failures are found inside the compiled loop. The carry is (params, opt_state, failed),
`failed` the int32 index of the first epoch whose loss or update was not finite (-1 while
there is none): from that epoch on the weights stay those of the last finite step and
later epochs do nothing, so the host reads the failed epoch exactly with the chunk's
losses, and never has to replay anything. The host reads chunk c-1 while chunk c runs
(`in_flight = 2`): the copies of losses and `failed` in a chunk's output survive the
carry's donation to the next chunk.

`remat=True` checkpoints the trunk in about sqrt(depth) segments (`jax.checkpoint`,
nothing saved inside a segment): the backward pass recomputes a segment's activations
instead of keeping them; less memory, one more trunk forward.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from hetcore.backend import Chunk, EngineOptions, Final
from hetcore.errors import UsageError
from hetcore.schedule import chunk_length, remat_segments
from hetcore.settings import LOOPS as ALL_LOOPS
from hetcore.settings import Settings
from jaxhet.device import describe, resolve_device
from jaxhet.model import PRECISIONS, gaussian_nll
from jaxhet.weights import put, to_state_dict

LOOPS = ALL_LOOPS["jax"]  # named once, in hetcore.settings

# The loop that finishes a run soonest, compile time included, on every platform (from
# scripts/bench.py's figures, docs/performance.md): `scan` and `step` compile in about the
# same time, and the whole chunk as one program is at least as fast as a Python-driven step
# on a CPU; on a GPU (reasoned, not yet measured) it also removes the per-epoch dispatch
# that would dominate an epoch of a few tens of microseconds.
DEFAULT_LOOP = "scan"

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
    carry as is. `failed` becomes `index` at the first epoch whose loss or update is not
    finite (see the module docstring)."""
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
    """One epoch; also returns the next epoch's index, so that the host feeds the device
    its own counter back instead of sending a scalar every epoch."""
    carry, out = epoch(graphdef, full, carry, x, y, lr, active, index, remat)
    return carry, out, index + 1


def _predict(graphdef, full: bool, params, x, y):
    mu, var = nnx.merge(graphdef, params)(x)
    return mu, var, gaussian_nll(mu, var, y, full)


_scan_jit = jax.jit(_scan_chunk, static_argnums=(0, 1, 2, 3, 4), donate_argnums=(5,))
_step_jit = jax.jit(_step, static_argnums=(0, 1, 2), donate_argnums=(3,))
predict_jit = jax.jit(_predict, static_argnums=(0, 1))

_compiled: dict = {}


def signature(tree) -> tuple:
    return tuple((leaf.shape, str(leaf.dtype)) for leaf in jax.tree.leaves(tree))


def compile_once(fn, key, *args):
    """Ahead-of-time compile, cached by what shapes the program (never by values)."""
    if key not in _compiled:
        _compiled[key] = fn.lower(*args).compile()
    return _compiled[key]


def make_runner(loop: str, graphdef, full: bool, length: int, carry, x, y, lr, device,
                remat: bool = False, unroll: int = 1):
    """(runner, compiled program) for `loop`: `runner(carry, n, start) -> (carry, losses,
    failed)` runs the n epochs from epoch `start`; `losses` and `failed` are device arrays
    whose first n entries are the chunk's losses and, after each epoch, the carry's
    `failed`. Nothing is read back to the host."""
    sig = signature((carry, x, y, lr))
    i32 = np.int32  # a strongly typed scalar: the compiled programs take int32
    if loop == "scan":
        unroll = max(1, min(unroll, length))
        key = ("scan", graphdef, length, full, remat, unroll, sig, device)
        chunk = compile_once(_scan_jit, key, graphdef, length, full, remat, unroll, carry, x,
                             y, lr, i32(length), i32(0))

        def runner(carry, n, start):
            carry, (losses, failed) = chunk(carry, x, y, lr, i32(n), i32(start))
            return carry, losses, failed

        return runner, chunk
    on = jax.device_put(jnp.asarray(True), device)
    key = ("step", graphdef, full, remat, sig, device)
    step = compile_once(_step_jit, key, graphdef, full, remat, carry, x, y, lr, on,
                        jax.device_put(i32(0), device))

    def runner(carry, n, start):
        out = []
        index = jax.device_put(i32(start), device)  # one transfer per chunk
        for _ in range(n):
            carry, loss_failed, index = step(carry, x, y, lr, on, index)
            out.append(loss_failed)
        losses, failed = (jnp.stack(v) for v in zip(*out))
        return carry, losses, failed

    return runner, step


class JaxEngine:
    """hetcore.backend.Engine for JAX (see the module docstring)."""

    in_flight = 2

    def __init__(self, settings: Settings, x: np.ndarray, y: np.ndarray, weights: dict,
                 optimizer: dict | None = None, options: EngineOptions = EngineOptions()):
        self.loop = DEFAULT_LOOP if settings.loop == "auto" else settings.loop
        if self.loop not in LOOPS:
            raise UsageError(f"--loop {self.loop}: not a jax loop; jax has auto, "
                             f"{', '.join(LOOPS)}")
        if options.unroll != 1 and self.loop != "scan":
            raise UsageError(f"unroll {options.unroll}: only the jax scan loop unrolls, not "
                             f"{self.loop}")
        dtype, self.full = settings.dtype, settings.full
        dev = resolve_device(settings.device)
        self.device = describe(dev)
        t0 = time.perf_counter()
        self.graphdef, params = put(weights, dtype, dev, PRECISIONS[options.matmul_precision],
                                    settings.width, settings.depth)
        opt_state = optax.sgd(settings.lr).init(params)
        if optimizer is not None:
            leaves, tree = jax.tree.flatten(opt_state)
            if len(optimizer) != len(leaves):
                raise UsageError(f"--resume: optimizer state has {len(optimizer)} tensors, "
                                 f"expected {len(leaves)}")
            opt_state = jax.device_put(
                jax.tree.unflatten(tree, [optimizer[str(i)] for i in range(len(leaves))]), dev)
        self.carry = new_carry(params, opt_state, dev)
        self.x, self.y = jax.device_put(x, dev), jax.device_put(y, dev)
        lr = jax.device_put(jnp.asarray(settings.lr, dtype=dtype), dev)
        length = chunk_length(settings.epochs, settings.chunk_epochs, settings.checkpoint_every)
        self.runner, self.compiled = make_runner(
            self.loop, self.graphdef, self.full, length, self.carry, self.x, self.y, lr, dev,
            settings.remat, options.unroll)
        key = ("predict", self.graphdef, self.full, signature((params, self.x, self.y)), dev)
        self.predict = compile_once(predict_jit, key, self.graphdef, self.full, params,
                                    self.x, self.y)
        self.compile_s = time.perf_counter() - t0

    def launch(self, start: int, count: int):
        self.carry, losses, failed = self.runner(self.carry, count, start)
        return start, count, losses, failed

    def read(self, handle) -> Chunk:
        """A failed epoch whose loss is finite had its update refused for making the
        weights non-finite; the weights stayed finite, so no later loss is non-finite."""
        start, count, losses, failed = handle
        chunk = Chunk.from_losses(start, np.asarray(losses)[:count])
        last_failed = int(np.asarray(failed)[count - 1])
        if chunk.failed is None and last_failed >= 0:
            return Chunk(chunk.losses, last_failed, update_failed=True)
        return chunk

    def state(self):
        params, opt_state, _ = self.carry
        return (to_state_dict(params),
                {str(i): np.asarray(a) for i, a in enumerate(jax.tree.leaves(opt_state))})

    def wait(self) -> None:
        jax.block_until_ready(self.carry)

    def finish(self) -> Final:
        params = self.carry[0]
        mu, var, loss = self.predict(params, self.x, self.y)
        return Final(to_state_dict(params), np.asarray(mu)[:, 0], np.asarray(var)[:, 0],
                     float(loss))
