"""jaxhet: the lecture's heteroscedastic regression in Flax NNX, trained by jit-compiled SGD.

Mirrors torchhet name for name. Imports JAX, Flax, optax and numpy, never torch.
"""

from jaxhet.model import HeteroscedasticMLP, gaussian_nll, softplus

__all__ = ["HeteroscedasticMLP", "gaussian_nll", "softplus"]
