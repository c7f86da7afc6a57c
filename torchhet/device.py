"""Choosing the device: --device auto|cpu|gpu|tpu; mirrors jaxhet/device.py."""

from __future__ import annotations

import contextlib
import functools
import os

import numpy as np
import torch

from hetcore.errors import UsageError

# torch's float32 matmul precision for each hetcore.backend.EngineOptions.matmul_precision:
# "highest" never uses TF32; "high" lets CUDA use TF32 (a CPU computes float32 either way).
_TORCH_PRECISION = {"highest": "highest", "tf32": "high"}


def available() -> list[str]:
    """The platforms present, best first."""
    return (["gpu"] if torch.cuda.is_available() else []) + ["cpu"]


def resolve_device(name: str = "auto") -> torch.device:
    """cuda:0 for gpu (and for auto when CUDA is present), else cpu."""
    if name == "auto":
        name = "gpu" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "gpu" and torch.cuda.is_available():
        return torch.device("cuda", 0)
    if name in ("gpu", "tpu"):
        raise UsageError(
            f"--device {name}: not available to torch; available: {', '.join(available())}"
        )
    raise UsageError(f"--device {name}: unknown device; choose auto, cpu, gpu or tpu")


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{device.index or 0} ({torch.cuda.get_device_name(device)})"
    return "cpu:0 (cpu)"


def platform(device: torch.device) -> str:
    """"gpu" for CUDA, else "cpu"."""
    return "gpu" if device.type == "cuda" else "cpu"


def memory_bytes(device: torch.device) -> int:
    """Memory the device offers: the GPU's total, or the host's physical memory."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[1])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def flushing_subnormals() -> bool:
    """Whether this thread's CPU arithmetic flushes subnormal floats to zero (torch has a
    setter, torch.set_flush_denormal, and no getter: a subnormal float32 survives a
    multiplication by one only when nothing is flushed). One answer for both of x86's
    modes (FTZ, DAZ), as the setter sets both."""
    return torch.tensor(1e-39, dtype=torch.float32, device="cpu").mul(1.0).item() == 0.0


@functools.cache
def _start_intra_op_pool() -> None:
    """Start torch's intra-op threads (OpenMP's team), once, before the first flush: a
    thread inherits its creator's floating-point modes, so a team started under the flush
    would keep it after the run, where the process had it off."""
    torch.zeros(1 << 17).add_(1.0)  # above ATen's grain size: a parallel loop


@contextlib.contextmanager
def arithmetic(precision: str = "highest"):
    """Run the block with torch's float32 matmul precision for `precision` ("highest" or
    "tf32") and, as XLA's CPU code does, subnormal results flushed to zero on the CPU, then
    put the process's own settings back.

    The flush is torch.set_flush_denormal's: this thread's x86 FTZ and DAZ modes (a no-op
    where the CPU has none). It covers what this thread computes, which is where the
    subnormals cost: the element-wise work of a small batch (ATen's loops below their
    grain size, Inductor's one-thread loops in compile-update). torch's intra-op threads
    (large element-wise loops, MKL's products) keep their own mode: started before the
    first flush, they never inherit it. Why flush at all: Adam's first moment of a weight
    whose gradient is exactly zero (a dead ReLU unit's) shrinks by beta1 every update and
    becomes subnormal after about 750 updates, and x86 CPUs compute on subnormals through
    slow microcode (docs/numerics.md, docs/performance.md). Flushing changes only values
    below 1.2e-38 in float32 (2.2e-308 in float64), which XLA flushes as well."""
    before = torch.get_float32_matmul_precision()
    _start_intra_op_pool()
    flushed = flushing_subnormals()
    torch.set_float32_matmul_precision(_TORCH_PRECISION[precision])
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(flushed)
        torch.set_float32_matmul_precision(before)


def to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """A copy on `device` (numpy arrays may be read-only or non-contiguous)."""
    return torch.tensor(np.asarray(a), device=device)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); a CPU runs every op before returning."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
