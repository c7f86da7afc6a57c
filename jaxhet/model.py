"""The two-headed network and its loss, in Flax NNX; mirrors torchhet/model.py."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from hetcore.interchange import init_bound
from hetcore.settings import EPS

# Full float32 products on every device: without it TPUs and recent GPUs may multiply
# float32 in bf16 or TF32. "tf32" (hetcore.backend.EngineOptions) is the explicit, labelled
# way to let them.
PRECISION = jax.lax.Precision.HIGHEST
PRECISIONS = {"highest": PRECISION, "tf32": jax.lax.Precision.DEFAULT}
SOFTPLUS_THRESHOLD = 20.0  # torch.nn.functional.softplus's default


@jax.custom_vjp
def softplus(x: jax.Array) -> jax.Array:
    """torch.nn.functional.softplus (beta 1, threshold 20), forward and backward formulas
    as torch writes them, so that both frameworks round alike."""
    # The minimum keeps exp from overflowing in the branch that where() discards.
    return jnp.where(x > SOFTPLUS_THRESHOLD, x, jnp.log1p(jnp.exp(jnp.minimum(x, SOFTPLUS_THRESHOLD))))


def _softplus_fwd(x):
    return softplus(x), x


def _softplus_bwd(x, g):
    z = jnp.exp(jnp.minimum(x, SOFTPLUS_THRESHOLD))
    return (jnp.where(x > SOFTPLUS_THRESHOLD, g, g * z / (z + 1)),)


softplus.defvjp(_softplus_fwd, _softplus_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def first_pair(x, w1, b1, w2, precision):
    """The trunk's first two products, `relu(x @ w1 + b1) @ w2` (x (N, 1), w1 (1, W), w2
    (W, W)), as the two Linear layers compute them, with a backward that computes w2's
    gradient as `h1^T @ g` from h1 recomputed in the (W, N) layout: element-wise from x,
    so no transpose is materialised and the product is canonical. XLA's CPU products take
    `h1^T @ g` from (N, W) operands markedly slower (docs/performance.md), which is why
    programs on a CPU train with this (jaxhet.engine.paired_layers); the other gradients
    are autodiff's own formulas."""
    return _first_pair_fwd(x, w1, b1, w2, precision)[0]


def _dense(a, b, precision, contract=((1,), (0,))):
    return jax.lax.dot_general(a, b, (contract, ((), ())), precision=precision)


def _first_pair_fwd(x, w1, b1, w2, precision):
    h1 = nnx.relu(_dense(x, w1, precision) + b1.reshape(1, -1))
    return _dense(h1, w2, precision), (x, w1, b1, w2, h1)


def _first_pair_bwd(precision, res, g):
    x, w1, b1, w2, h1 = res
    dh1 = _dense(g, w2, precision, ((1,), (1,)))
    h1t = nnx.relu(w1.reshape(-1, 1) * x.reshape(1, -1) + b1.reshape(-1, 1))  # (W, N)
    dw2 = _dense(h1t, g, precision)
    dz1 = jnp.where(h1 > 0, dh1, jnp.zeros_like(dh1))
    dx = _dense(dz1, w1, precision, ((1,), (1,)))
    dw1 = _dense(x, dz1, precision, ((0,), (0,)))
    return dx, dw1, jnp.sum(dz1, 0), dw2


first_pair.defvjp(_first_pair_fwd, _first_pair_bwd)


def _uniform_init(bound: float):
    """U(-bound, bound), the law of hetcore.interchange.init_bounds (torch.nn.Linear's)."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _linear(fan_in: int, fan_out: int, dtype, rngs: nnx.Rngs, precision) -> nnx.Linear:
    init = _uniform_init(init_bound(fan_in))
    return nnx.Linear(
        fan_in, fan_out, dtype=dtype, param_dtype=dtype, precision=precision,
        kernel_init=init, bias_init=init, rngs=rngs,
    )


class HeteroscedasticMLP(nnx.Module):
    """ReLU trunk of `depth` Linear(width) layers, a mean head and a variance head.

    Attribute names and Sequential indices follow the lecture's NormalModel, so that
    `layers.2.weight` in torch is `layers.layers[2].kernel` (transposed) here.
    """

    def __init__(self, width: int = 512, depth: int = 2, *, dtype=jnp.float32,
                 rngs: nnx.Rngs, in_features: int = 1, precision=PRECISION):
        trunk = []
        fan_in = in_features
        for _ in range(depth):
            trunk += [_linear(fan_in, width, dtype, rngs, precision), nnx.relu]
            fan_in = width
        self.layers = nnx.Sequential(*trunk)
        self.mean_head = _linear(width, 1, dtype, rngs, precision)
        self.var_head = _linear(width, 1, dtype, rngs, precision)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.heads(self.layers(x))

    def paired(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """__call__ with the first two layers as first_pair (depth >= 2, one feature)."""
        first, second = self.layers.layers[0], self.layers.layers[2]
        h = nnx.relu(first_pair(x, first.kernel[...], first.bias[...], second.kernel[...],
                                first.precision) + second.bias[...].reshape(1, -1))
        for m in self.layers.layers[4:]:
            h = m(h)
        return self.heads(h)

    def heads(self, features: jax.Array) -> tuple[jax.Array, jax.Array]:
        """mu and var (N, 1) from the trunk's features (N, width)."""
        mu = self.mean_head(features)
        var = softplus(self.var_head(features)) + EPS
        return mu, var


def gaussian_nll(mu: jax.Array, var: jax.Array, target: jax.Array, full: bool = False) -> jax.Array:
    """The lecture's loss: mean of log(var)/2 + (target - mu)**2 / (2 var).

    With `full`, adds 0.5*log(2*pi) as torch.nn.GaussianNLLLoss(full=True) does.
    """
    loss = jnp.mean(jnp.log(var) / 2 + (target - mu) ** 2 / (2 * var))
    if full:
        loss = loss + 0.5 * math.log(2 * math.pi)
    return loss


def point_nll(mu: jax.Array, var: jax.Array, target: jax.Array, full: bool = False) -> jax.Array:
    """Each point's NLL, log(var)/2 + (target - mu)**2 / (2 var) (+ 0.5*log(2*pi))."""
    nll = jnp.log(var) / 2 + (target - mu) ** 2 / (2 * var)
    return nll + 0.5 * math.log(2 * math.pi) if full else nll


def training_loss(loss: str, mu: jax.Array, var: jax.Array, target: jax.Array,
                  full: bool = False, beta=None) -> jax.Array:
    """The loss a run trains on (hetcore.settings.LOSSES): nll, the lecture's; beta-nll
    (Seitzer et al., 2022), the mean of stop_gradient(var)**beta times each point's NLL
    (beta 0 is the NLL, the weight being exactly 1); mse, the mean of (target - mu)**2,
    which gives the variance head no gradient."""
    if loss == "nll":
        return gaussian_nll(mu, var, target, full)
    if loss == "beta-nll":
        return jnp.mean(jax.lax.stop_gradient(var) ** beta * point_nll(mu, var, target, full))
    return jnp.mean((target - mu) ** 2)


def point_loss(loss: str, mu: jax.Array, var: jax.Array, target: jax.Array,
               full: bool = False, beta=None) -> jax.Array:
    """Each point's term of training_loss, whose mean that loss is: what a data-parallel
    run sums over its share of a batch (jaxhet.parallel)."""
    if loss == "nll":
        return point_nll(mu, var, target, full)
    if loss == "beta-nll":
        return jax.lax.stop_gradient(var) ** beta * point_nll(mu, var, target, full)
    return (target - mu) ** 2
