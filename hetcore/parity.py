"""Comparing two runs of the same settings, data and initial weights (framework-neutral)."""

from __future__ import annotations

import numpy as np

from hetcore.results import RunResult


def _diff(a, b) -> dict:
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    d = np.abs(a - b)
    i = int(np.argmax(d))
    scale = np.maximum(np.abs(a), np.abs(b))
    rel = np.divide(d, scale, out=np.zeros_like(d), where=scale > 0)
    return {"max_abs": float(d[i]), "max_rel": float(rel.max()), "at": i}


def compare(a: RunResult, b: RunResult) -> dict:
    """Largest differences between two runs, per quantity and per tensor, and where."""
    out = {
        "frameworks": [a.framework, b.framework],
        "dtype": a.dtype,
        "epochs": len(a.loss_history),
        "initial_weights_identical": all(
            np.array_equal(a.initial_weights[n], b.initial_weights[n]) for n in a.initial_weights
        ),
        "loss_history": _diff(a.loss_history, b.loss_history),
        "final_loss": _diff([a.final_loss], [b.final_loss]),
        "mu": _diff(a.mu, b.mu),
        "sigma": _diff(a.sigma, b.sigma),
        "weights": {n: _diff(a.weights[n], b.weights[n]) for n in a.weights},
    }
    gap = np.abs(np.asarray(a.loss_history, np.float64) - np.asarray(b.loss_history, np.float64))
    out["loss_gap_per_epoch"] = [float(g) for g in gap]
    return out
