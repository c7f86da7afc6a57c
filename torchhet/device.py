"""Choosing the device: --device auto|cpu|gpu|tpu; mirrors jaxhet/device.py."""

from __future__ import annotations

import os

import torch

from hetcore.errors import UsageError


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


def memory_bytes(device: torch.device) -> int:
    """Memory the device offers: the GPU's total, or the host's physical memory."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[1])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
