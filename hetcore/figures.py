"""Figures: a run's fit, loss curve and calibration curve, and the comparisons of losses and
of the two frameworks."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

COLORS = {"data": "#337538", "fit": "#2E2585", "band": "#94CBEC", "true": "#444444",
          "jax": "#2E2585", "torch": "#C2452D", "held": "#DC7700"}


# Points a figure draws at most per data set: more only blacken the scatter and swell the
# SVG (10^6 points are ~100 MB of it); above this, an evenly spaced subset in x is drawn.
MAX_DRAWN = 5000
# Scatters of data points are drawn as an image inside the SVG (lines, bands and text stay
# vector): thousands of points as SVG paths made the file several MB and its writing the
# slowest part of a run's figures (docs/performance.md, "Whole commands").
POINTS = {"rasterized": True}


def _drawn(n: int) -> np.ndarray:
    """Indices of the points drawn of n sorted by x: all, or MAX_DRAWN evenly spaced ones
    with both ends."""
    return np.arange(n) if n <= MAX_DRAWN else np.unique(
        np.linspace(0, n - 1, MAX_DRAWN).round().astype(np.int64))


def fit_figure(x, y, mu, sigma, title: str, true_mean=None, true_sigma=None, held_out=None,
               label: str = "training data", members=None):
    """Two panels sharing x. Above: the data (held-out points apart, hollow), the mean, the
    mu +- 2 sigma band, and the true ones dashed when known. Below: the standardised
    residuals (y - mu) / sigma, with the +-1 and +-2 lines a calibrated fit keeps about 68%
    and 95% of the points within.

    held_out: (x, y, mu, sigma) of held-out data, drawn apart; None: none.
    label: what (x, y) are called in the legend.
    members: an ensemble's (mu_k, sigma_k) at x, each member's mean and band edges drawn
      faintly behind the mixture's (mu, sigma); None: one model.
    Of more than MAX_DRAWN points, an evenly spaced subset in x is drawn (the legend says).
    """
    n = np.asarray(x).size
    order = np.argsort(x, kind="stable")[_drawn(n)]
    x, y, mu, sigma = (np.asarray(a, dtype=np.float64)[order] for a in (x, y, mu, sigma))
    if order.size < n:
        label = f"{label} ({order.size} of {n} drawn)"
    fig, (ax, rax) = plt.subplots(2, 1, figsize=(8, 6.8), dpi=120, sharex=True,
                                  gridspec_kw={"height_ratios": [3, 1.25]})
    ax.scatter(x, y, s=8, color=COLORS["data"], alpha=0.6, label=label, zorder=1, **POINTS)
    if held_out is not None:
        held_order = np.argsort(np.asarray(held_out[0]), kind="stable")
        held_order = held_order[_drawn(held_order.size)]
        held_out = tuple(np.asarray(a, np.float64)[held_order] for a in held_out)
        hx, hy = held_out[:2]
        ax.scatter(hx, hy, s=10, facecolors="none", edgecolors=COLORS["held"], linewidths=0.7,
                   alpha=0.7, label="held-out data", zorder=1, **POINTS)
    which = "mixture" if members is not None else "fit"
    for k, (mk, sk) in enumerate(members or ()):
        mk, sk = (np.asarray(a, np.float64)[order] for a in (mk, sk))
        ax.plot(x, mk, color=COLORS["fit"], linewidth=0.8, alpha=0.35, zorder=2,
                label=f"members' $\\mu_k$, $\\mu_k \\pm 2\\sigma_k$ ({len(members)})"
                if k == 0 else None)
        for edge in (mk - 2 * sk, mk + 2 * sk):
            ax.plot(x, edge, color=COLORS["fit"], linewidth=0.5, alpha=0.2, zorder=2)
    ax.fill_between(x, mu - 2 * sigma, mu + 2 * sigma, color=COLORS["band"], alpha=0.5,
                    linewidth=0, label=rf"{which} $\mu \pm 2\sigma$", zorder=2)
    ax.plot(x, mu, color=COLORS["fit"], linewidth=2.5, label=rf"{which} $\mu$", zorder=3)
    if true_mean is not None:
        tm = np.asarray(true_mean, dtype=np.float64)[order]
        ax.plot(x, tm, "--", color=COLORS["true"], linewidth=1.5, label="true mean", zorder=4)
        if true_sigma is not None:
            ts = np.asarray(true_sigma, dtype=np.float64)[order]
            ax.plot(x, tm + 2 * ts, ":", color=COLORS["true"], linewidth=1.5,
                    label=r"true $\pm 2\sigma$", zorder=4)
            ax.plot(x, tm - 2 * ts, ":", color=COLORS["true"], linewidth=1.5, zorder=4)
    ax.set_ylabel("y")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=9, framealpha=0.9)

    rax.scatter(x, (y - mu) / sigma, s=6, color=COLORS["data"], alpha=0.6, zorder=2, **POINTS)
    if held_out is not None:
        hx, hy, hm, hs = held_out
        rax.scatter(hx, (hy - hm) / hs, s=8, facecolors="none", edgecolors=COLORS["held"],
                    linewidths=0.6, alpha=0.7, zorder=2, **POINTS)
    for k, style in ((1, ":"), (2, "--")):
        for sign in (1, -1):
            rax.axhline(sign * k, color=COLORS["true"], linestyle=style, linewidth=1.0,
                        zorder=1)
    rax.axhline(0, color=COLORS["true"], linewidth=0.6, zorder=1)
    rax.set(xlabel="x", ylabel=r"$(y - \mu) / \sigma$")
    rax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def loss_figure(loss_history, title: str, held_out_curve=None):
    """The training loss per epoch and, when there are held-out data, the same loss
    function on them at each chunk's end (markers). A curve that stays positive over more
    than two decades is drawn on a log scale."""
    loss = np.asarray(loss_history, np.float64)
    fig, ax = plt.subplots(figsize=(8, 4.6), dpi=120)
    ax.plot(np.arange(loss.size), loss, color=COLORS["fit"], linewidth=1.4,
            label="training loss (each epoch, before its update)")
    values = [loss]
    if held_out_curve is not None and np.asarray(held_out_curve).shape[1]:
        epochs, held = np.asarray(held_out_curve, np.float64)
        ax.plot(epochs, held, "o-", color=COLORS["held"], markersize=4, linewidth=1.0,
                label="held-out loss (each chunk's end)")
        values.append(held)
    finite = np.concatenate([v[np.isfinite(v)] for v in values])
    if finite.size and finite.min() > 0 and finite.max() > 100 * finite.min():
        ax.set_yscale("log")
    ax.set(xlabel="epoch", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    fig.tight_layout()
    return fig


def calibration_figure(curves: dict, title: str):
    """Observed against expected proportion of points inside the central intervals, one
    curve per data set, with the diagonal of a calibrated fit.

    curves: {label: (expected, observed, metrics)} with metrics holding mace and
    miscalibration_area (shown in the legend)."""
    fig, ax = plt.subplots(figsize=(5.6, 5.4), dpi=120)
    ax.plot([0, 1], [0, 1], "--", color=COLORS["true"], linewidth=1.0, label="calibrated")
    for (label, (expected, observed, m)), color in zip(curves.items(),
                                                        (COLORS["fit"], COLORS["held"])):
        ax.plot(expected, observed, color=color, linewidth=1.8,
                label=f"{label} (MACE {m['mace']:.3f}, area {m['miscalibration_area']:.3f})")
    ax.set(xlabel="expected proportion in the central interval",
           ylabel="observed proportion", xlim=(0, 1), ylim=(0, 1), title=title)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


def parity_figure(jax_result, torch_result, x, *, axes=None, dtype=None, loss=None,
                  floor_gaps=None, bound=None, reference=None, band=None, data=None):
    """Both loss curves; the gap per epoch (log scale) with the one-ulp floor; both bands.

    Called as parity_figure(jax_result, torch_result, x) it compares two finished runs at
    their training points x. The keyword arguments replace or add to what the results give:

    Args:
      axes: three axes to draw into (one row of a larger figure); default a new figure.
      loss: (jax, torch) loss per epoch.
      floor_gaps: per-epoch gaps of the one-ulp twin runs; drawn thin with their envelope.
      bound: the per-epoch bound on the running gap (hetcore.criteria.trajectory_bound).
      reference: {"jax": ..., "torch": ...} float32 distances from the float64 run.
      band: {"x", "mu_jax", "sigma_jax", "mu_torch", "sigma_torch"} on a dense grid.
      data: (x, y) training points, drawn faintly under the bands.

    Returns:
      The figure that holds the axes.
    """
    if loss is None:
        loss = (jax_result.loss_history, torch_result.loss_history)
    if band is None:
        xs = np.asarray(x, dtype=np.float64).reshape(-1)
        band = {"x": xs, "mu_jax": jax_result.mu, "sigma_jax": jax_result.sigma,
                "mu_torch": torch_result.mu, "sigma_torch": torch_result.sigma}
    dtype = dtype or getattr(jax_result, "dtype", "")
    lj, lt = (np.asarray(v, dtype=np.float64) for v in loss)
    epochs = np.arange(len(lj))
    if axes is None:
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.6), dpi=110)
        own = True
    else:
        fig, own = axes[0].figure, False

    ax = axes[0]
    ax.plot(epochs, lj, color=COLORS["jax"], linewidth=1.5, label="jax")
    ax.plot(epochs, lt, "--", color=COLORS["torch"], linewidth=1.2, label="torch")
    ax.set(xlabel="epoch", ylabel="loss", title=f"loss per epoch ({dtype})")
    ax.legend()

    ax = axes[1]

    def positive(v):  # log axes: zeros (identical values) are left out
        v = np.asarray(v, dtype=np.float64)
        return np.where(v > 0, v, np.nan)

    if floor_gaps:
        for k, g in enumerate(floor_gaps):
            ax.semilogy(epochs, positive(g), color="#999999", linewidth=0.6, alpha=0.7,
                        label="one-ulp twin gaps" if k == 0 else None)
        env = np.max(np.stack([np.maximum.accumulate(np.asarray(g, np.float64))
                               for g in floor_gaps]), axis=0)
        ax.semilogy(epochs, positive(env), color="#E69F00", linewidth=2.0,
                    label="one-ulp floor (running max)")
    ax.semilogy(epochs, positive(np.abs(lj - lt)), color="black", linewidth=1.0,
                label="|jax - torch|")
    ax.semilogy(epochs, positive(np.maximum.accumulate(np.abs(lj - lt))), "--", color="black",
                linewidth=1.0, label="|jax - torch| running max")
    if bound is not None:
        ax.semilogy(epochs, positive(bound), ":", color="#C2452D", linewidth=1.5,
                    label="bound on running gap")
    if reference is not None:
        ax.semilogy(epochs, positive(reference["jax"]), color=COLORS["jax"], linewidth=0.8,
                    alpha=0.8, label="|jax - float64 ref|")
        ax.semilogy(epochs, positive(reference["torch"]), color=COLORS["torch"],
                    linewidth=0.8, alpha=0.8, label="|torch - float64 ref|")
    ax.set(xlabel="epoch", ylabel="loss gap", title="gap per epoch (zeros omitted)")
    ax.legend(fontsize=7, loc="upper left")

    ax = axes[2]
    order = np.argsort(np.asarray(band["x"], np.float64), kind="stable")
    xs = np.asarray(band["x"], np.float64)[order]
    mj, sj, mt, st = (np.asarray(band[k], np.float64)[order]
                      for k in ("mu_jax", "sigma_jax", "mu_torch", "sigma_torch"))
    if data is not None:
        ax.scatter(np.asarray(data[0]), np.asarray(data[1]), s=4, color=COLORS["data"],
                   alpha=0.3, zorder=1, **POINTS)
    ax.fill_between(xs, mj - 2 * sj, mj + 2 * sj, color=COLORS["band"], alpha=0.5,
                    linewidth=0, label=r"jax $\mu \pm 2\sigma$", zorder=2)
    ax.plot(xs, mt - 2 * st, "--", color=COLORS["torch"], linewidth=1.0,
            label=r"torch $\mu \pm 2\sigma$", zorder=3)
    ax.plot(xs, mt + 2 * st, "--", color=COLORS["torch"], linewidth=1.0, zorder=3)
    ax.set(xlabel="x", ylabel="y", title=r"fitted bands $\mu \pm 2\sigma$")
    ax.legend(loc="upper left", fontsize=8)
    twin = ax.twinx()
    twin.semilogy(xs, positive(np.abs(sj - st)), ".", color="gray", markersize=1.5)
    twin.set_ylabel(r"$|\sigma_{jax} - \sigma_{torch}|$ (gray)", color="gray")

    if own:
        fig.suptitle(f"jax vs torch ({dtype}, {len(lj)} epochs)")
        fig.tight_layout()
    return fig


def loss_comparison_figure(x, y, fits: dict, true_mean=None, true_sigma=None, title: str = ""):
    """One panel per fit, side by side on the same axes: the data, the fit's mean and its
    mu +- 2 sigma band, the true ones dashed when known, the fit's CRPS and MACE in its
    legend and its other metrics in its corner. fits: {loss name: (mu, sigma, final
    metrics)}."""
    order = np.argsort(np.asarray(x), kind="stable")
    xs, ys = (np.asarray(a, np.float64)[order] for a in (x, y))
    fig, axes = plt.subplots(1, len(fits), figsize=(5.2 * len(fits), 4.6), dpi=110,
                             sharex=True, sharey=True, squeeze=False)
    for ax, (name, (mu, sigma, final)) in zip(axes[0], fits.items()):
        mu, sigma = (np.asarray(a, np.float64)[order] for a in (mu, sigma))
        ax.scatter(xs, ys, s=5, color=COLORS["data"], alpha=0.35, zorder=1, **POINTS)
        scores = ", ".join(f"{label} {final[key]:.3f}" for key, label in
                           (("crps", "CRPS"), ("mace", "MACE")) if key in final)
        ax.fill_between(xs, mu - 2 * sigma, mu + 2 * sigma, color=COLORS["band"], alpha=0.5,
                        linewidth=0, label=r"$\mu \pm 2\sigma$" + (f" ({scores})" if scores
                                                                    else ""), zorder=2)
        ax.plot(xs, mu, color=COLORS["fit"], linewidth=2.2, label=r"$\mu$", zorder=3)
        if true_mean is not None:
            tm = np.asarray(true_mean, np.float64)[order]
            ax.plot(xs, tm, "--", color=COLORS["true"], linewidth=1.2, label="true mean",
                    zorder=4)
            if true_sigma is not None:
                ts = np.asarray(true_sigma, np.float64)[order]
                for sign in (1, -1):
                    ax.plot(xs, tm + sign * 2 * ts, ":", color=COLORS["true"], linewidth=1.2,
                            label=r"true $\pm 2\sigma$" if sign == 1 else None, zorder=4)
        lines = [f"coverage 2$\\sigma$ {final['coverage_2sigma']:.1%}",
                 f"NLL {final['nll']:.3f}"]
        for key, label in (("mean_rmse", "RMSE($\\mu$, true)"), ("sigma_mae", "$\\sigma$ MAE")):
            if key in final:
                lines.append(f"{label} {final[key]:.3f}")
        ax.text(0.98, 0.03, "\n".join(lines), transform=ax.transAxes, ha="right", va="bottom",
                fontsize=9, bbox=dict(facecolor="white", alpha=0.85, edgecolor="#cccccc"))
        ax.set(title=name, xlabel="x")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8, framealpha=0.9)
    axes[0][0].set_ylabel("y")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def extrapolation_figure(x, y, grid, mixture, member, title: str, true_mean=None):
    """An ensemble beyond its data: above, the data, the training range shaded, one
    member's mu +- 2 sigma (outlined) and the mixture's (filled), the true mean dashed when
    known; below, both sigmas on a log scale. mixture, member: (mu, sigma) on `grid`."""
    fig, (ax, low) = plt.subplots(2, 1, figsize=(9, 6.6), dpi=110, sharex=True,
                                  gridspec_kw={"height_ratios": [3, 1.3]})
    lo, hi = float(np.min(x)), float(np.max(x))
    keep = _drawn(len(x))
    order = np.argsort(np.asarray(x), kind="stable")[keep]
    (mm, ms), (om, os_) = mixture, member
    for a in (ax, low):
        a.axvspan(lo, hi, color="#eeeeee", zorder=0, label="training range" if a is ax
                  else None)
        a.grid(alpha=0.3)
    ax.scatter(np.asarray(x)[order], np.asarray(y)[order], s=6, color=COLORS["data"],
               alpha=0.4, zorder=1, label="training data", **POINTS)
    ax.fill_between(grid, mm - 2 * ms, mm + 2 * ms, color=COLORS["band"], alpha=0.55,
                    linewidth=0, zorder=2, label=r"mixture $\mu \pm 2\sigma$")
    ax.plot(grid, mm, color=COLORS["fit"], linewidth=2.2, zorder=3, label=r"mixture $\mu$")
    for sign in (1, -1):
        ax.plot(grid, om + sign * 2 * os_, color=COLORS["held"], linewidth=1.1, zorder=3,
                label=r"one member $\mu \pm 2\sigma$" if sign == 1 else None)
    if true_mean is not None:
        ax.plot(grid, true_mean, "--", color=COLORS["true"], linewidth=1.4, zorder=4,
                label="true mean")
    ax.set(ylabel="y", title=title)
    ax.legend(loc="upper left", fontsize=8, framealpha=0.9)
    low.semilogy(grid, ms, color=COLORS["fit"], linewidth=1.8, label=r"mixture $\sigma$")
    low.semilogy(grid, os_, color=COLORS["held"], linewidth=1.2, label=r"one member $\sigma$")
    low.set(xlabel="x", ylabel=r"$\sigma$")
    low.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


def save(fig, stem: str, formats=("png", "svg")) -> list[str]:
    """Save as stem.png and stem.svg; returns the paths."""
    paths = []
    for fmt in formats:
        path = f"{stem}.{fmt}"
        # No date and fixed element ids: the same run writes the same bytes.
        with matplotlib.rc_context({"svg.hashsalt": "jaxhet"}):
            fig.savefig(path, format=fmt, metadata={"Date": None} if fmt == "svg" else None)
        paths.append(path)
    plt.close(fig)
    return paths
