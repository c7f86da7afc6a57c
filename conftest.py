"""What both suites (tests/, parity_tests/) share: the allocator setting, loud shape errors,
and the markers' meaning (registered in pyproject.toml)."""

import os

# Both frameworks share a GPU where there is one, and the command-line tests' child
# processes too: JAX must not take 75% of its memory at its first use.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402 - after the allocator setting above
import pytest  # noqa: E402

# As Equinox's suite does: silent rank broadcasting fails loudly.
jax.config.update("jax_numpy_rank_promotion", "raise")


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    """Every test under parity_tests/ needs both frameworks (`cross`); a `gpu` test is
    skipped where no CUDA GPU is."""
    cuda = None
    for item in items:
        if "parity_tests" in item.path.parts:
            item.add_marker(pytest.mark.cross)
        if item.get_closest_marker("gpu"):
            cuda = _cuda() if cuda is None else cuda
            if not cuda:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
