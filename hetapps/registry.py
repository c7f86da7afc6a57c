"""Framework name -> its backend (hetcore.backend.Backend) and measurements
(hetcore.backend.Measure), imported only when asked for: `--framework jax` works without
torch installed, and the other way round."""

from __future__ import annotations

import importlib

from hetcore.errors import UsageError
from hetcore.settings import BACKENDS

PACKAGES = {"jax": "jaxhet", "torch": "torchhet"}
assert tuple(PACKAGES) == BACKENDS


def _load(name: str, module: str, label: str | None):
    label = label or f"--framework {name}"
    if name not in PACKAGES:
        raise UsageError(f"{label}: unknown framework; choose {', '.join(PACKAGES)}")
    try:
        return importlib.import_module(f"{PACKAGES[name]}.{module}")
    except ImportError as e:
        raise UsageError(f"{label}: cannot import it ({e})") from None


def backend(name: str, label: str | None = None):
    """The backend of framework `name` (jaxhet.backend or torchhet.backend); `label` names
    it in a refusal (default: --framework NAME)."""
    return _load(name, "backend", label)


def measure(name: str, label: str | None = None):
    """The benchmark's measurements inside framework `name` (jaxhet.measure, torchhet.measure)."""
    return _load(name, "measure", label)


def names(framework: str) -> list[str]:
    """The frameworks a --framework value stands for ("both": jax then torch)."""
    return list(BACKENDS) if framework == "both" else [framework]
