"""torchhet: the lecture's heteroscedastic regression in PyTorch.

Mirrors jaxhet name for name. Imports torch and numpy, never JAX.
"""

from torchhet.model import HeteroscedasticMLP, gaussian_nll, softplus

__all__ = ["HeteroscedasticMLP", "gaussian_nll", "softplus"]
