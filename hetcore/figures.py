"""Figures: the fit (SPEC section 3) and the two frameworks' comparison."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

COLORS = {"data": "#337538", "fit": "#2E2585", "band": "#94CBEC", "true": "#444444",
          "jax": "#2E2585", "torch": "#C2452D"}


def fit_figure(x, y, mu, sigma, title: str, true_mean=None, true_sigma=None):
    """Data, the mean, the mu +- 2 sigma band, and the true ones dashed when known."""
    order = np.argsort(x, kind="stable")
    x, y, mu, sigma = (np.asarray(a, dtype=np.float64)[order] for a in (x, y, mu, sigma))
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    ax.scatter(x, y, s=8, color=COLORS["data"], alpha=0.6, label="training data", zorder=1)
    ax.fill_between(x, mu - 2 * sigma, mu + 2 * sigma, color=COLORS["band"], alpha=0.5,
                    linewidth=0, label=r"fit $\mu \pm 2\sigma$", zorder=2)
    ax.plot(x, mu, color=COLORS["fit"], linewidth=2.5, label=r"fit $\mu$", zorder=3)
    if true_mean is not None:
        tm = np.asarray(true_mean, dtype=np.float64)[order]
        ax.plot(x, tm, "--", color=COLORS["true"], linewidth=1.5, label="true mean", zorder=4)
        if true_sigma is not None:
            ts = np.asarray(true_sigma, dtype=np.float64)[order]
            ax.plot(x, tm + 2 * ts, ":", color=COLORS["true"], linewidth=1.5,
                    label=r"true $\pm 2\sigma$", zorder=4)
            ax.plot(x, tm - 2 * ts, ":", color=COLORS["true"], linewidth=1.5, zorder=4)
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=9, framealpha=0.9)
    fig.tight_layout()
    return fig


def parity_figure(jax_result, torch_result, x):
    """Both loss curves, their gap per epoch (log scale), and both sigma bands."""
    lj = np.asarray(jax_result.loss_history, dtype=np.float64)
    lt = np.asarray(torch_result.loss_history, dtype=np.float64)
    epochs = np.arange(len(lj))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), dpi=110)
    ax = axes[0]
    ax.plot(epochs, lj, color=COLORS["jax"], label="jax")
    ax.plot(epochs, lt, "--", color=COLORS["torch"], label="torch")
    ax.set(xlabel="epoch", ylabel="loss", title="loss per epoch")
    ax.legend()
    ax = axes[1]
    gap = np.abs(lj - lt)
    ax.semilogy(epochs, np.where(gap > 0, gap, np.nan), color="black")
    ax.set(xlabel="epoch", ylabel="|loss_jax - loss_torch|", title="gap per epoch (zeros omitted)")
    ax = axes[2]
    order = np.argsort(np.asarray(x).reshape(-1), kind="stable")
    xs = np.asarray(x, dtype=np.float64).reshape(-1)[order]
    sj, st = jax_result.sigma[order], torch_result.sigma[order]
    ax.plot(xs, sj, color=COLORS["jax"], label=r"$\sigma$ jax")
    ax.plot(xs, st, "--", color=COLORS["torch"], label=r"$\sigma$ torch")
    twin = ax.twinx()
    twin.semilogy(xs, np.abs(sj - st) + 1e-300, color="gray", linewidth=0.8)
    twin.set_ylabel(r"$|\Delta\sigma|$", color="gray")
    ax.set(xlabel="x", ylabel=r"$\sigma(x)$", title="fitted noise level")
    ax.legend(loc="upper left")
    fig.suptitle(f"jax vs torch ({jax_result.dtype}, {len(lj)} epochs)")
    fig.tight_layout()
    return fig


def save(fig, stem: str, formats=("png", "svg")) -> list[str]:
    """Save as stem.png and stem.svg; returns the paths."""
    paths = []
    for fmt in formats:
        path = f"{stem}.{fmt}"
        fig.savefig(path, format=fmt)
        paths.append(path)
    plt.close(fig)
    return paths
