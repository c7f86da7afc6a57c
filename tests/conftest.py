"""Suite-wide settings: loud shape errors, full-precision products, small shared fixtures."""

import os

# Both frameworks share a GPU where there is one: JAX must not take 75% of it up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402 - after the allocator setting above
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# As Equinox's suite does: silent rank broadcasting fails loudly.
jax.config.update("jax_numpy_rank_promotion", "raise")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def small_state():
    """Factory: a small state dict drawn by numpy (neither framework's initialiser)."""

    def make(width=8, depth=2, dtype="float32", seed=0):
        from hetcore.interchange import shapes

        rng = np.random.default_rng(seed)
        return {n: (rng.standard_normal(s) * 0.5).astype(dtype)
                for n, s in shapes(width, depth).items()}

    return make


@pytest.fixture
def small_data():
    def make(n=32, dtype="float32", seed=1):
        from hetcore.data import synthetic

        return synthetic(n, seed).columns(dtype)

    return make
