"""Cross-framework parity suite: full-precision products, the device from HET_DEVICE.

One command runs it on any device:

    HET_DEVICE=gpu .venv/bin/python -m pytest -q parity_tests      # default: cpu

Full float32 matmul precision is pinned in both frameworks here, as well as inside
jaxhet/torchhet, so that no test ever compares a TF32 or bf16 product.
"""

import os

import jax
import pytest
import torch

jax.config.update("jax_default_matmul_precision", "highest")
torch.set_float32_matmul_precision("highest")
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

DEVICE = os.environ.get("HET_DEVICE", "cpu")
if DEVICE not in ("cpu", "gpu", "tpu", "auto"):
    raise pytest.UsageError(f"HET_DEVICE={DEVICE!r}: use cpu, gpu, tpu or auto")


@pytest.fixture(scope="session")
def device() -> str:
    """The --device both frameworks run on (HET_DEVICE, default cpu)."""
    return DEVICE


@pytest.fixture(scope="module", autouse=True)
def _torch_threads():
    """torch runs one CPU thread in this suite unless HET_TORCH_THREADS says otherwise: with
    two OpenMP threads on two cores shared with any other process, torch's epoch slows ~15x
    (measured: 100 lecture epochs 2.1 s with one thread, 33 s with two, under load). Parity
    does not depend on it: the comparisons are between frameworks, not thread counts. The
    setting is put back after each module, so other suites in the same session keep theirs.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("HET_TORCH_THREADS", "1")))
    yield
    torch.set_num_threads(before)
