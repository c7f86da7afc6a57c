"""jaxhet's side of the backend contract (hetcore.backend.Backend); mirrors
torchhet/backend.py name for name.

Imports JAX, Flax, optax and numpy, never torch.
"""

from __future__ import annotations

import platform as _platform

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from hetcore.backend import EngineOptions
from hetcore.errors import UsageError
from hetcore.settings import OPTION_DEFAULTS, Settings
from jaxhet.device import describe, memory_bytes, platform, resolve_device  # noqa: F401
from jaxhet.device import enable_x64, x64_tracing
from jaxhet.engine import LOOPS, JaxEngine, loss_fn, predict_jit
from jaxhet.model import HeteroscedasticMLP
from jaxhet.weights import put, to_state_dict

NAME = "jax"  # the contract: hetcore.backend.Backend; the device functions come from device.py

_loss_and_grad_jit = jax.jit(jax.value_and_grad(loss_fn), static_argnums=(1, 4, 5, 6))


def init_weights(width: int, depth: int, dtype: str, seed: int) -> dict[str, np.ndarray]:
    """Initial weights drawn from `seed` through jax.random (nnx.Rngs), as a state dict."""
    enable_x64(dtype)
    model = HeteroscedasticMLP(width, depth, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(params=seed))
    return to_state_dict(nnx.state(model, nnx.Param))


def _inputs(weights: dict, x: np.ndarray, device: str):
    dtype = str(np.asarray(x).dtype)
    dev = resolve_device(device)
    graphdef, params = put(weights, dtype, dev)
    return graphdef, params, dev


def _beta(x: np.ndarray, beta: float | None):
    return np.asarray(OPTION_DEFAULTS["beta"] if beta is None else beta, np.asarray(x).dtype)


def predict(weights: dict, x: np.ndarray, device: str = "auto", full: bool = False,
            y: np.ndarray | None = None, loss: str = "nll", beta: float | None = None):
    """(mu, var, loss) as numpy for a state dict and inputs x (N, 1); loss needs y."""
    graphdef, params, dev = _inputs(weights, x, device)
    xs = jax.device_put(np.asarray(x), dev)
    ys = jax.device_put(np.asarray(x if y is None else y), dev)
    with x64_tracing():
        mu, var, value = predict_jit(graphdef, loss, full, params, xs, ys, _beta(x, beta))
    return np.asarray(mu), np.asarray(var), (None if y is None else float(value))


def loss_and_grad(weights: dict, x: np.ndarray, y: np.ndarray, device: str = "auto",
                  full: bool = False, loss: str = "nll", beta: float | None = None
                  ) -> tuple[float, dict[str, np.ndarray]]:
    """Loss and the gradient of every parameter, gradients as a torch-layout state dict."""
    graphdef, params, dev = _inputs(weights, x, device)
    with x64_tracing():
        value, grads = _loss_and_grad_jit(params, graphdef, jax.device_put(x, dev),
                                          jax.device_put(y, dev), full, False, loss,
                                          _beta(x, beta))
    return float(value), to_state_dict(grads)


def versions() -> dict:
    import flax
    import jaxlib

    return {
        "python": _platform.python_version(), "numpy": np.__version__, "jax": jax.__version__,
        "jaxlib": jaxlib.__version__, "flax": flax.__version__, "optax": optax.__version__,
    }


def join(settings: Settings, cluster: dict) -> tuple[int, int]:
    """jax.distributed when --coordinator is given (jaxhet.parallel.initialize)."""
    from jaxhet import parallel

    if cluster.get("coordinator") is not None:
        parallel.initialize(cluster["coordinator"], cluster.get("num_processes"),
                            cluster.get("process_id"))
    elif cluster.get("num_processes") is not None or cluster.get("process_id") is not None:
        raise UsageError("--num-processes, --process-id: need --coordinator HOST:PORT (or "
                         "--coordinator auto on a cluster)")
    return jax.process_index(), jax.process_count()


def leave() -> None:
    """jax.distributed shuts down at exit by itself."""


def engine(settings: Settings, x: np.ndarray, y: np.ndarray, weights: dict,
           optimizer: dict | None = None, options: EngineOptions = EngineOptions(),
           held_out: tuple[np.ndarray, np.ndarray] | None = None) -> JaxEngine:
    """A compiled engine for the run (jaxhet.engine; an ensemble's: jaxhet.ensemble)."""
    if settings.ensemble > 1:
        from jaxhet.ensemble import JaxEnsembleEngine

        return JaxEnsembleEngine(settings, x, y, weights, optimizer, options, held_out)
    return JaxEngine(settings, x, y, weights, optimizer, options, held_out)
