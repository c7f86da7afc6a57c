"""Training loops, each a way to run the same SGD epoch; mirrors torchhet/loops.py.

- `scan`: a chunk of epochs is one compiled `lax.scan` (the default: one dispatch and one
  host sync per chunk, weights donated so XLA updates them in place);
- `step`: one jit-compiled epoch per Python call, for comparison.

Both present the same runner: `runner(carry, n) -> (carry, losses)`, `losses` a device
array whose first `n` entries are the chunk's losses; nothing is read back to the host.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxhet.model import gaussian_nll

LOOPS = ("scan", "step")


def default_loop(platform: str) -> str:
    """The loop that finishes a run soonest, compile time included, on this platform."""
    return "scan"


def loss_fn(params, graphdef, x, y, full: bool):
    mu, var = nnx.merge(graphdef, params)(x)
    return gaussian_nll(mu, var, y, full)


def epoch(graphdef, full: bool, carry, x, y, lr, active):
    """One SGD epoch; `active` false (masked tail) or a non-finite loss leaves carry as is.

    carry = (params, opt_state, ok); `ok` turns false at the first non-finite loss, so that
    the weights stay those of the last finite step and later epochs do nothing.
    """
    params, opt_state, ok = carry
    tx = optax.sgd(lr)
    loss, grads = jax.value_and_grad(loss_fn)(params, graphdef, x, y, full)
    updates, new_opt_state = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    finite = jnp.isfinite(loss)
    apply = ok & active & finite
    keep = lambda new, old: jnp.where(apply, new, old)  # noqa: E731
    params = jax.tree.map(keep, new_params, params)
    opt_state = jax.tree.map(keep, new_opt_state, opt_state)
    ok = ok & (finite | ~active)
    return (params, opt_state, ok), loss


def _scan_chunk(graphdef, length: int, full: bool, carry, x, y, lr, n_active):
    """`length` epochs as one lax.scan; epochs from `n_active` on are masked."""

    def body(carry, i):
        return epoch(graphdef, full, carry, x, y, lr, i < n_active)

    return jax.lax.scan(body, carry, jnp.arange(length))


_scan_jit = jax.jit(_scan_chunk, static_argnums=(0, 1, 2), donate_argnums=(3,))
_step_jit = jax.jit(epoch, static_argnums=(0, 1), donate_argnums=(2,))

_compiled: dict = {}


def signature(tree) -> tuple:
    return tuple((leaf.shape, str(leaf.dtype)) for leaf in jax.tree.leaves(tree))


def compile_once(fn, key, *args):
    """Ahead-of-time compile, cached by what shapes the program (never by values)."""
    if key not in _compiled:
        _compiled[key] = fn.lower(*args).compile()
    return _compiled[key]


def make_runner(loop: str, graphdef, full: bool, length: int, carry, x, y, lr, device):
    """(runner, compile seconds) for `loop`; see the module docstring."""
    if loop not in LOOPS:
        raise ValueError(f"jax loop must be one of {LOOPS}, got {loop!r}")
    sig = signature((carry, x, y, lr))
    t0 = time.perf_counter()
    if loop == "scan":
        n0 = jax.device_put(jnp.asarray(length, jnp.int32), device)
        key = ("scan", graphdef, length, full, sig, device)
        chunk = compile_once(_scan_jit, key, graphdef, length, full, carry, x, y, lr, n0)

        def runner(carry, n):
            return chunk(carry, x, y, lr, jnp.asarray(n, jnp.int32))
    else:
        on = jax.device_put(jnp.asarray(True), device)
        key = ("step", graphdef, full, sig, device)
        step = compile_once(_step_jit, key, graphdef, full, carry, x, y, lr, on)

        def runner(carry, n):
            losses = []
            for _ in range(n):
                carry, loss = step(carry, x, y, lr, on)
                losses.append(loss)
            return carry, jnp.stack(losses)
    return runner, time.perf_counter() - t0
