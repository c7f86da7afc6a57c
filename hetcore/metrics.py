"""Metrics of a fitted model's predictive Gaussians N(mu, sigma^2) on data (float64
arithmetic, numpy and scipy only).

The scores and calibration metrics follow uncertainty-toolbox's definitions
(`uncertainty_toolbox.get_all_metrics` with its defaults), the common reference for
judging predictive uncertainty; tests/test_metrics.py checks each against it:

- `nll_full`: the mean of -log N(y; mu, sigma^2), the constant included;
- `crps`: the mean Gaussian CRPS (scoringrules.crps_normal);
- `check_score`: the pinball loss of the Gaussian's q-quantile, averaged over the 99 levels
  q = 0.01, ..., 0.99 and the points (scoringrules.quantile_score);
- `interval_score`: the interval (Winkler) score of the central interval of probability p,
  averaged over p = 0.01, ..., 0.99 and the points (scoringrules.interval_score);
- `mace`, `rmsce`: the mean absolute and root mean square gap between the expected
  proportion p (100 values, linspace(0, 1, 100)) and the observed share of points inside
  the central interval of probability p;
- `miscalibration_area`: the area between that calibration curve and the diagonal,
  crossings traced exactly;
- `sharpness`: sqrt(mean(sigma^2)).

scoringrules (the maintained library of proper scores, with numpy, JAX and torch backends)
computes the three scores it has in closed form. Its numpy backend is the one used: the
metrics are computed once, from either framework's predictions, in the base layer, so
that both frameworks are judged by the same code. The log score is written out,
0.5 log(2 pi sigma^2) + z^2 / 2: scoringrules' `logs_normal` takes the log of the density,
which underflows to -inf once |z| passes about 38 (a collapsed sigma early in training),
where the closed form stays exact. No scoring library computes the calibration curve's
metrics; they are counted here from sorted standardised residuals, so 10^6 points take a
fraction of a second (uncertainty-toolbox loops over points in Python).
"""

from __future__ import annotations

import math

import numpy as np
import scoringrules
from scipy.special import ndtri

SCORE_LEVELS = np.linspace(0.01, 0.99, 99)  # check and interval scores (resolution 99)
EXPECTED = np.linspace(0.0, 1.0, 100)  # the calibration curve's expected proportions
LOG_2PI = math.log(2 * math.pi)
BACKEND = "numpy"  # scoringrules' backend: plain float64 numpy, no JIT, no device

# metrics.json keys of the scores and calibration metrics, in their order there.
SCORE_KEYS = ("nll_full", "crps", "check_score", "interval_score", "sharpness")
CALIBRATION_KEYS = ("mace", "rmsce", "miscalibration_area")


def _flat64(*arrays) -> list[np.ndarray]:
    return [np.asarray(a, dtype=np.float64).reshape(-1) for a in arrays]


def gaussian_scores(y, mu, sigma) -> dict:
    """The proper scores and sharpness of N(mu, sigma^2) at observations y (see the module
    docstring)."""
    y, mu, sigma = _flat64(y, mu, sigma)
    z = (y - mu) / sigma
    check = interval = 0.0
    for q in SCORE_LEVELS:  # one level at a time: memory of a few (N,) arrays, any N
        quantile = mu + sigma * ndtri(q)
        check += float(np.mean(scoringrules.quantile_score(y, quantile, q, backend=BACKEND)))
    for p in SCORE_LEVELS:
        lower, upper = mu + sigma * ndtri(0.5 - p / 2), mu + sigma * ndtri(0.5 + p / 2)
        interval += float(np.mean(scoringrules.interval_score(y, lower, upper, 1.0 - p,
                                                              backend=BACKEND)))
    return {
        "nll_full": float(np.mean(0.5 * LOG_2PI + np.log(sigma) + 0.5 * z * z)),
        "crps": float(np.mean(scoringrules.crps_normal(y, mu, sigma, backend=BACKEND))),
        "check_score": check / len(SCORE_LEVELS),
        "interval_score": interval / len(SCORE_LEVELS),
        "sharpness": float(np.sqrt(np.mean(sigma * sigma))),
    }


def interval_bounds(expected: np.ndarray = EXPECTED) -> tuple[np.ndarray, np.ndarray]:
    """The standard normal's central interval of each probability: (lower, upper)."""
    return ndtri(0.5 - expected / 2.0), ndtri(0.5 + expected / 2.0)


def calibration_curve(y, mu, sigma, expected: np.ndarray = EXPECTED) -> np.ndarray:
    """The observed share of points whose standardised residual (mu - y) / sigma lies in
    the central interval of each expected probability, ends included."""
    y, mu, sigma = _flat64(y, mu, sigma)
    z = np.sort((mu - y) / sigma)
    lower, upper = interval_bounds(expected)
    inside = np.searchsorted(z, upper, side="right") - np.searchsorted(z, lower, side="left")
    return inside / z.size


def _area_curve(y, mu, sigma, expected: np.ndarray = EXPECTED) -> np.ndarray:
    """The curve the miscalibration area is traced from: the share of points with
    |mu - y| / sigma <= the interval's upper end (uncertainty-toolbox's own, which differs
    from `calibration_curve` only where ndtri(0.5 - p/2) rounds apart from -ndtri(0.5 + p/2))."""
    y, mu, sigma = _flat64(y, mu, sigma)
    sd = np.sort(np.abs(mu - y) / sigma)
    return np.searchsorted(sd, ndtri(0.5 + expected / 2.0), side="right") / sd.size


def area_between(x: np.ndarray, d: np.ndarray) -> float:
    """The area between a piecewise linear curve and the axis, |d| integrated over x, where
    the curve crosses the axis inside a segment traced exactly (two triangles)."""
    h, dl, dr = np.diff(x), d[:-1], d[1:]
    cross = dl * dr < 0
    with np.errstate(divide="ignore", invalid="ignore"):
        hourglass = h * (dl * dl + dr * dr) / (2 * (np.abs(dl) + np.abs(dr)))
    return float(np.sum(np.where(cross, hourglass, h * np.abs(dl + dr) / 2)))


def calibration_metrics(y, mu, sigma) -> dict:
    """mace, rmsce and miscalibration_area of N(mu, sigma^2) at y (module docstring)."""
    gap = calibration_curve(y, mu, sigma) - EXPECTED
    return {
        "mace": float(np.mean(np.abs(gap))),
        "rmsce": float(np.sqrt(np.mean(gap * gap))),
        "miscalibration_area": area_between(EXPECTED, _area_curve(y, mu, sigma) - EXPECTED),
    }


def mixture(mu, var) -> tuple[np.ndarray, np.ndarray]:
    """The Gaussian of an ensemble's K members' Gaussians, moment matched (Lakshminarayanan
    et al., 2017): mu = mean_k mu_k, var = mean_k var_k + mean_k (mu_k - mu)^2, in float64.
    mu, var: (K, N)."""
    mu, var = (np.asarray(a, np.float64) for a in (mu, var))
    mean = mu.mean(axis=0)
    return mean, var.mean(axis=0) + ((mu - mean) ** 2).mean(axis=0)


def final_metrics(y: np.ndarray, mu: np.ndarray, var: np.ndarray, loss: float | None,
                  true_sigma: np.ndarray | None = None,
                  true_mean: np.ndarray | None = None) -> dict:
    """`final` (training data) or `test` (held-out data) block of metrics.json.

    loss: the training loss of the final weights on these data, as the framework computed
      it (None: not reported).
    rmse: of y - mu. nll: the full Gaussian negative log-likelihood per point (as
      nll_full, computed from the variance instead of sigma).
    coverage_ksigma: fraction of points with |y - mu| <= k * sigma.
    The scores and calibration metrics: gaussian_scores and calibration_metrics.
    sigma_mae: mean |sigma - true sigma|, when the true noise level is known.
    mean_rmse: the root mean square of mu - true mean, when the true mean is known.
    """
    y, mu, var = _flat64(y, mu, var)
    sigma = np.sqrt(var)
    z = np.abs(y - mu) / sigma
    out = {} if loss is None else {"loss": float(loss)}
    out |= {
        "rmse": float(np.sqrt(np.mean((y - mu) ** 2))),
        "nll": float(np.mean(0.5 * np.log(2 * math.pi * var) + (y - mu) ** 2 / (2 * var))),
    }
    for k in (1, 2, 3):
        out[f"coverage_{k}sigma"] = float(np.mean(z <= k))
    out |= gaussian_scores(y, mu, sigma)
    out |= calibration_metrics(y, mu, sigma)
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
