"""Training: the whole run is jit-compiled `lax.scan` over epochs, dispatched in chunks
(jaxhet.loops holds the loops).

Mirrors torchhet/train.py. A run is a pure function of (settings, data, initial weights):
the compiled chunk takes weights, data and learning rate as arguments, so new values never
recompile; only the architecture, dtype, point count and chunk length are compiled in.
"""

from __future__ import annotations

import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from hetcore.checkpoint import Checkpoint, spans
from hetcore.errors import TrainingDiverged, UsageError
from hetcore.interchange import architecture
from hetcore.results import RunResult, chunk_length, first_nonfinite
from hetcore.settings import Settings
from jaxhet.device import describe, resolve_device
from jaxhet.loops import compile_once, default_loop, loss_fn, make_runner, new_carry, signature
from jaxhet.model import HeteroscedasticMLP, gaussian_nll
from jaxhet.weights import from_state_dict, to_state_dict

FRAMEWORK = "jax"


def enable_dtype(dtype: str) -> None:
    """float64 needs JAX's x64 mode; it is switched on once and left on (float32 runs set
    every dtype explicitly, so they are unaffected)."""
    if dtype == "float64" and not jax.config.jax_enable_x64:
        jax.config.update("jax_enable_x64", True)


def _abstract(width: int, depth: int, dtype: str):
    """GraphDef and abstract parameter State, without allocating any weights."""
    model = nnx.eval_shape(
        lambda: HeteroscedasticMLP(width, depth, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0))
    )
    graphdef, abstract = nnx.split(model, nnx.Param)
    return graphdef, abstract


def init_weights(width: int, depth: int, dtype: str, seed: int) -> dict[str, np.ndarray]:
    """Initial weights drawn from `seed` (torch's default law), as a state dict."""
    enable_dtype(dtype)
    model = HeteroscedasticMLP(width, depth, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(params=seed))
    return to_state_dict(nnx.state(model, nnx.Param))


def _forward(graphdef, full: bool, params, x, y):
    mu, var = nnx.merge(graphdef, params)(x)
    return mu, var, gaussian_nll(mu, var, y, full)


_forward_jit = jax.jit(_forward, static_argnums=(0, 1))
_loss_and_grad_jit = jax.jit(jax.value_and_grad(loss_fn), static_argnums=(1, 4))


def _put(state: dict, width: int, depth: int, dtype: str, device):
    graphdef, abstract = _abstract(width, depth, dtype)
    params = from_state_dict({n: np.asarray(a, dtype=dtype) for n, a in state.items()}, abstract)
    return graphdef, jax.device_put(params, device)


def predict(weights: dict, x: np.ndarray, device: str = "auto", full: bool = False,
            y: np.ndarray | None = None):
    """(mu, var, loss) as numpy for a state dict and inputs x (N, 1); loss needs y."""
    dtype = str(np.asarray(x).dtype)
    enable_dtype(dtype)
    dev = resolve_device(device)
    width, depth = architecture(weights)
    graphdef, params = _put(weights, width, depth, dtype, dev)
    xs = jax.device_put(np.asarray(x), dev)
    ys = jax.device_put(np.asarray(x if y is None else y), dev)
    mu, var, loss = _forward_jit(graphdef, full, params, xs, ys)
    return np.asarray(mu), np.asarray(var), (None if y is None else float(loss))


def loss_and_grad(weights: dict, x: np.ndarray, y: np.ndarray, device: str = "auto",
                  full: bool = False) -> tuple[float, dict[str, np.ndarray]]:
    """Loss and the gradient of every parameter, gradients as a torch-layout state dict."""
    dtype = str(np.asarray(x).dtype)
    enable_dtype(dtype)
    dev = resolve_device(device)
    width, depth = architecture(weights)
    graphdef, params = _put(weights, width, depth, dtype, dev)
    loss, grads = _loss_and_grad_jit(params, graphdef, jax.device_put(x, dev),
                                     jax.device_put(y, dev), full)
    return float(loss), to_state_dict(grads)


def versions() -> dict:
    import flax
    import jaxlib

    return {
        "python": platform.python_version(), "numpy": np.__version__, "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__, "optax": optax.__version__,
    }


def train(settings: Settings, x: np.ndarray, y: np.ndarray, initial_weights: dict,
          progress=None, resume: Checkpoint | None = None, on_checkpoint=None) -> RunResult:
    """Train from `initial_weights` (a state dict) on x, y (N, 1) as `settings` say.

    Args:
      settings: epochs, lr, dtype, device, loss option, chunk length, loop and checkpoint
        interval are read here.
      x, y: training data, (N, 1) arrays of settings.dtype.
      initial_weights: torch-layout state dict of settings.dtype.
      progress: optional callable(epochs_done, last_loss), called once per chunk.
      resume: a checkpoint of this run to continue from (its epoch, weights, optimiser state
        and loss history); the result is that of the uninterrupted run, bit for bit.
      on_checkpoint: callable(epoch, weights, optimizer, loss_history), called every
        settings.checkpoint_every epochs (and at the end) with host copies.

    Returns:
      RunResult. Raises TrainingDiverged at the first epoch whose loss is not finite.
    """
    dtype = settings.dtype
    enable_dtype(dtype)
    device = resolve_device(settings.device)
    start_weights = initial_weights if resume is None else resume.weights
    graphdef, params = _put(start_weights, settings.width, settings.depth, dtype, device)
    opt_state = optax.sgd(settings.lr).init(params)
    opt_leaves, opt_tree = jax.tree.flatten(opt_state)
    history = np.full(settings.epochs, np.nan)
    first = 0
    if resume is not None:
        first = resume.epoch
        history[:first] = resume.loss_history
        if len(resume.optimizer) != len(opt_leaves):
            raise UsageError(f"--resume: optimizer state has {len(resume.optimizer)} tensors, "
                             f"expected {len(opt_leaves)}")
        opt_state = jax.device_put(
            jax.tree.unflatten(opt_tree, [resume.optimizer[str(i)] for i in range(len(opt_leaves))]),
            device)
    carry = new_carry(params, opt_state, device)
    xs, ys = jax.device_put(x, device), jax.device_put(y, device)
    lr = jax.device_put(jnp.asarray(settings.lr, dtype=dtype), device)
    length = chunk_length(settings.epochs, settings.chunk_epochs, settings.checkpoint_every)

    loop = (default_loop(device.platform, settings.epochs) if settings.loop == "auto"
            else settings.loop)
    run_chunk, compile_s = make_runner(loop, graphdef, settings.full, length, carry, xs, ys, lr,
                                       device, settings.remat)
    t0 = time.perf_counter()
    fkey = ("forward", graphdef, settings.full, signature((params, xs, ys)), device)
    forward = compile_once(_forward_jit, fkey, graphdef, settings.full, params, xs, ys)
    compile_s += time.perf_counter() - t0

    pending: list = []
    diverged = None
    t0 = time.perf_counter()

    weights_diverged = False

    def consume():
        """Read a chunk's losses and failure index (the only host sync: once per chunk). A
        failed epoch whose loss is finite had its update refused for making the weights
        non-finite; the weights stayed finite, so no later loss is non-finite."""
        nonlocal diverged, weights_diverged
        start, n, losses, failed = pending.pop(0)
        part = np.asarray(losses)[:n]
        history[start:start + n] = part
        bad = first_nonfinite(part)
        last_failed = int(np.asarray(failed)[n - 1])
        if bad is not None:
            diverged = start + bad
        elif last_failed >= 0:
            diverged, weights_diverged = last_failed, True
        elif progress is not None:
            progress(start + n, float(part[-1]))

    for start, n, checkpoint_after in spans(first, settings.epochs, length,
                                            settings.checkpoint_every):
        carry, losses, failed = run_chunk(carry, n, start)
        pending.append((start, n, losses, failed))
        if checkpoint_after and on_checkpoint is not None:
            while pending and diverged is None:
                consume()
            if diverged is None:  # a diverged chunk never replaces the last good checkpoint
                on_checkpoint(start + n, to_state_dict(carry[0]),
                              {str(i): np.asarray(a) for i, a in
                               enumerate(jax.tree.leaves(carry[1]))},
                              history[:start + n].astype(dtype))
        elif len(pending) > 1:  # read chunk c-1 while chunk c runs
            consume()
        if diverged is not None:
            break
    while pending and diverged is None:
        consume()
    params = carry[0]
    jax.block_until_ready(params)
    train_s = time.perf_counter() - t0
    if diverged is not None:
        raise TrainingDiverged(FRAMEWORK, diverged, float(history[diverged]),
                               weights=weights_diverged)

    mu, var, loss = forward(params, xs, ys)
    return RunResult(
        framework=FRAMEWORK, device=describe(device), dtype=dtype,
        loss_history=history.astype(dtype), initial_weights=dict(initial_weights),
        weights=to_state_dict(params), mu=np.asarray(mu)[:, 0], var=np.asarray(var)[:, 0],
        final_loss=float(loss), compile_s=compile_s, train_s=train_s, versions=versions(),
        loop=loop,
    )
