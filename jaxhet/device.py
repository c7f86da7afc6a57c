"""Choosing the device: --device auto|cpu|gpu|tpu; mirrors torchhet/device.py."""

from __future__ import annotations

import os

import jax

from hetcore.errors import UsageError

_PLATFORMS = ("cpu", "gpu", "tpu")


def available() -> list[str]:
    """The platforms present, best first."""
    found = []
    for platform in ("tpu", "gpu", "cpu"):
        try:
            if jax.devices(platform):
                found.append(platform)
        except RuntimeError:
            pass
    return found


def resolve_device(name: str = "auto") -> jax.Device:
    """This process's first device of the requested platform; `auto` takes JAX's default
    backend (in a run over several processes, jaxhet.parallel, the devices of the others
    are not this process's to use)."""
    if name == "auto":
        return jax.local_devices()[0]
    if name not in _PLATFORMS:
        raise UsageError(f"--device {name}: unknown device; choose auto, cpu, gpu or tpu")
    try:
        devices = jax.local_devices(backend=name)
    except RuntimeError:
        devices = []
    if not devices:
        raise UsageError(
            f"--device {name}: not available to jax; available: {', '.join(available())}"
        )
    return devices[0]


def enable_x64(dtype: str) -> None:
    """float64 needs JAX's x64 mode: switched on at the first float64 use and left on
    (float32 runs give every dtype explicitly, so they are unaffected)."""
    if dtype == "float64" and not jax.config.jax_enable_x64:
        jax.config.update("jax_enable_x64", True)


def x64_tracing():
    """The context every jaxhet program is traced in: x64 mode on.

    Traced code that mixes a Python float with an integer array computes in the default
    float type, float64 in x64 mode and float32 without: optax's Adam bias correction
    `1 - b**count` is such a term. Traced without a fixed mode, a float32 run would round
    differently once any float64 run had switched x64 on in the same process (measured: the
    float32 Adam runs of parity_tests/test_recipes.py moved by ~1e-6 and passed or failed
    their bound by the order the tests ran in). Traced in x64 mode, every float32 program
    is the same whatever ran before, and its bias corrections are computed in float64 and
    rounded once, as torch.optim computes them in Python floats. Every array the programs
    take or make has an explicit dtype, so nothing else in a float32 run changes."""
    return jax.enable_x64(True)


def describe(device: jax.Device) -> str:
    kind = getattr(device, "device_kind", "") or device.platform
    return f"{device.platform}:{device.id} ({kind})"


def platform(device: jax.Device) -> str:
    """"cpu", "gpu" or "tpu" (JAX's own platform names; ROCm and CUDA are both "gpu")."""
    return "gpu" if device.platform in ("cuda", "rocm") else device.platform


def memory_bytes(device: jax.Device) -> int:
    """Memory the device offers: the accelerator's limit, or the host's physical memory."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
