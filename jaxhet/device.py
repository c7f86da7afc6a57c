"""Choosing the device: --device auto|cpu|gpu|tpu; mirrors torchhet/device.py."""

from __future__ import annotations

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
    """The first device of the requested platform; `auto` takes JAX's default backend."""
    if name == "auto":
        return jax.devices()[0]
    if name not in _PLATFORMS:
        raise UsageError(f"--device {name}: unknown device; choose auto, cpu, gpu or tpu")
    try:
        devices = jax.devices(name)
    except RuntimeError:
        devices = []
    if not devices:
        raise UsageError(
            f"--device {name}: not available to jax; available: {', '.join(available())}"
        )
    return devices[0]


def describe(device: jax.Device) -> str:
    kind = getattr(device, "device_kind", "") or device.platform
    return f"{device.platform}:{device.id} ({kind})"
