"""Metrics of a fitted model at its training points (float64 arithmetic, numpy only)."""

from __future__ import annotations

import math

import numpy as np


def final_metrics(y: np.ndarray, mu: np.ndarray, var: np.ndarray, loss: float,
                  true_sigma: np.ndarray | None = None,
                  true_mean: np.ndarray | None = None) -> dict:
    """`final` block of metrics.json.

    loss: the training loss of the final weights, as the framework computed it.
    nll: the full Gaussian negative log-likelihood per point, constant included.
    coverage_ks: fraction of points with |y - mu| <= k * sigma.
    sigma_mae: mean |sigma - true sigma|, when the true noise level is known.
    mean_rmse: the root mean square of mu - true mean, when the true mean is known.
    """
    y, mu, var = (np.asarray(a, dtype=np.float64).reshape(-1) for a in (y, mu, var))
    sigma = np.sqrt(var)
    z = np.abs(y - mu) / sigma
    out = {
        "loss": float(loss),
        "rmse": float(np.sqrt(np.mean((y - mu) ** 2))),
        "nll": float(np.mean(0.5 * np.log(2 * math.pi * var) + (y - mu) ** 2 / (2 * var))),
    }
    for k in (1, 2, 3):
        out[f"coverage_{k}sigma"] = float(np.mean(z <= k))
    if true_sigma is not None:
        out["sigma_mae"] = float(np.mean(np.abs(sigma - np.asarray(true_sigma).reshape(-1))))
    if true_mean is not None:
        out["mean_rmse"] = float(np.sqrt(np.mean((mu - np.asarray(true_mean).reshape(-1)) ** 2)))
    return out


# Bandwidths the oracle picks from, with hindsight, for each data set.
ORACLE_BANDWIDTHS = (0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7)


def oracle_sigma(x: np.ndarray, y: np.ndarray, true_mean: np.ndarray, bandwidth: float
                 ) -> np.ndarray:
    """sigma at each x as a Gaussian kernel of `bandwidth` smooths the squared residuals
    from the true mean: what no model can know (the true mean), the best one can hope of
    the noise from one draw."""
    x = np.asarray(x, np.float64).reshape(-1)
    r2 = (np.asarray(y, np.float64).reshape(-1) - np.asarray(true_mean).reshape(-1)) ** 2
    k = np.exp(-0.5 * ((x[:, None] - x[None, :]) / bandwidth) ** 2)  # (N, N)
    return np.sqrt(k @ r2 / k.sum(1))


def oracle_sigma_mae(x, y, true_mean, true_sigma) -> tuple[float, float]:
    """(sigma MAE, bandwidth) of the kernel oracle whose bandwidth (ORACLE_BANDWIDTHS) is
    the best for this very draw: the data's own limit on recovering sigma."""
    true_sigma = np.asarray(true_sigma, np.float64).reshape(-1)
    best = min((float(np.mean(np.abs(oracle_sigma(x, y, true_mean, h) - true_sigma))), h)
               for h in ORACLE_BANDWIDTHS)
    return best
