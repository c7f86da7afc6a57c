"""Small shared fixtures of tests/ (the settings both suites share: ../conftest.py)."""

import os

import numpy as np
import pytest

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
