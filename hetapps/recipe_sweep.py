"""The sweep that chose `--recipe calibrated` (`python scripts/recipe_sweep.py`): candidate
recipes trained on fresh synthetic draws (`--preset none --seed S`), each judged by how well
it recovers the true noise level against the kernel oracle on the same draw
(hetcore.metrics.oracle_sigma_mae), by its 2-sigma coverage of the training points, by the
RMSE of its mean against sin(x), and by its wall time (compile included).

Two kinds of candidate train nothing and are judged as the recipes are: `kernel-H`, the
oracle's smoother at one bandwidth H for every draw (it knows the true mean, as no model
does, but not which bandwidth suits this draw), and `truth`, the law itself (the true mean
and sigma): what a fixed, good smoother and the exact answer reach on each draw.

Writes DIR/sweep.json (every run) and DIR/sweep.md (the summary table); docs/recipes.md
shows the sweep as run.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np

from hetapps import options, registry
from hetcore import data, driver, metrics, outputs
from hetcore.errors import UsageError
from hetcore.settings import Settings

# Targets of the calibrated recipe, on any seed, in both frameworks, float32.
MAX_RATIO = 1.25  # sigma MAE over the oracle's
COVERAGE = (0.94, 0.97)  # of the training points within 2 sigma
MAX_MEAN_RMSE = 0.05  # of mu against sin(x)
MAX_SECONDS = 60.0

# Each candidate: the options it gives on top of --preset none --seed S (the lecture's
# 500 points, width 512, depth 2). The ingredients, one at a time from the prototype.
CANDIDATES = {
    "lecture": dict(recipe="lecture"),
    "lecture-20k": dict(recipe="lecture", epochs=20000),
    "prototype": dict(optimizer="adam", lr=1e-3, warmup_steps=100, schedule="cosine",
                      loss="beta-nll", beta=0.5, epochs=2000),
    "prototype-nll": dict(optimizer="adam", lr=1e-3, warmup_steps=100, schedule="cosine",
                          loss="nll", epochs=2000),
    "prototype-constant": dict(optimizer="adam", lr=1e-3, warmup_steps=100, loss="beta-nll",
                               beta=0.5, epochs=2000),
    "prototype-1000": dict(optimizer="adam", lr=1e-3, warmup_steps=100, schedule="cosine",
                           loss="beta-nll", beta=0.5, epochs=1000),
    "prototype-4000": dict(optimizer="adam", lr=1e-3, warmup_steps=100, schedule="cosine",
                           loss="beta-nll", beta=0.5, epochs=4000),
    "prototype-beta1": dict(optimizer="adam", lr=1e-3, warmup_steps=100, schedule="cosine",
                            loss="beta-nll", beta=1.0, epochs=2000),
    "prototype-lr3e-4": dict(optimizer="adam", lr=3e-4, warmup_steps=100, schedule="cosine",
                             loss="beta-nll", beta=0.5, epochs=2000),
    "prototype-b100": dict(optimizer="adam", lr=1e-3, warmup_steps=100, schedule="cosine",
                           loss="beta-nll", beta=0.5, epochs=2000, batch_size=100),
    "prototype-adamw": dict(optimizer="adamw", weight_decay=1e-2, lr=1e-3, warmup_steps=100,
                            schedule="cosine", loss="beta-nll", beta=0.5, epochs=2000),
}


def evaluate(settings: Settings) -> dict:
    """One run's figures: sigma MAE and the oracle's, coverage, mean RMSE, seconds."""
    backend = registry.backend(settings.framework)
    ds = data.for_settings(settings)
    held = data.held_out(settings, ds)
    x, y = ds.columns(settings.dtype)
    hx, hy = held.columns(settings.dtype)
    t0 = time.perf_counter()
    weights, _ = driver.initial_weights(settings, backend)
    r = driver.train(backend, settings, x, y, weights, held_out=(hx, hy))
    seconds = time.perf_counter() - t0
    final = metrics.final_metrics(y, r.mu, r.var, r.final_loss, ds.true_sigma(),
                                  ds.true_mean())
    test = metrics.final_metrics(hy, r.held_out.mu, r.held_out.var, r.held_out.loss)
    oracle, bandwidth = metrics.oracle_sigma_mae(ds.x, ds.y, ds.true_mean(), ds.true_sigma())
    return {"seed": settings.seed, "framework": settings.framework, "seconds": seconds,
            "sigma_mae": final["sigma_mae"], "oracle_sigma_mae": oracle,
            "oracle_bandwidth": bandwidth, "ratio": final["sigma_mae"] / oracle,
            "coverage_2sigma": final["coverage_2sigma"], "mean_rmse": final["mean_rmse"],
            "final_loss": final["loss"], "test_crps": test["crps"], "test_mace": test["mace"],
            "test_coverage_2sigma": test["coverage_2sigma"]}


KERNEL = "kernel-"  # prefix of the fixed-bandwidth smoothers' names: kernel-0.3
TRUTH = "truth"  # the law's own mean and sigma
VARIANCE_FLOOR = 1e-6  # the model's (softplus + 1e-6), added to the truth's variance


def kernel_bandwidth(name: str) -> float | None:
    """H of a `kernel-H` candidate (None for any other)."""
    if not name.startswith(KERNEL):
        return None
    try:
        h = float(name[len(KERNEL):])
    except ValueError:
        h = math.nan
    if not (math.isfinite(h) and 0 < h <= 100):
        raise UsageError(f"--candidates {name}: expected {KERNEL}H with a bandwidth H in "
                         "(0, 100], e.g. kernel-0.3")
    return h


def evaluate_reference(settings: Settings, bandwidth: float | None) -> dict:
    """The figures of `evaluate` for a candidate that trains nothing, on the draw `settings`
    names: its mean is the true sin(x) (RMSE 0), its sigma the oracle's smoother at
    `bandwidth` or, for None, the true sigma; the held-out draw shares the training x, so the
    same sigma serves it."""
    t0 = time.perf_counter()
    ds = data.for_settings(settings)
    held = data.held_out(settings, ds)
    mu = ds.true_mean()
    # the truth's sigma is 0 at x = +-3: the variance head's floor keeps its scores finite
    var = (ds.true_sigma() ** 2 + VARIANCE_FLOOR if bandwidth is None
           else metrics.oracle_sigma(ds.x, ds.y, mu, bandwidth) ** 2)
    nll = float(np.mean(0.5 * np.log(2 * math.pi * var) + (ds.y - mu) ** 2 / (2 * var)))
    final = metrics.final_metrics(ds.y, mu, var, nll, ds.true_sigma(), mu)
    test = metrics.final_metrics(held.y, mu, var, None)
    oracle, best = metrics.oracle_sigma_mae(ds.x, ds.y, mu, ds.true_sigma())
    return {"seed": settings.seed, "framework": "numpy", "seconds": time.perf_counter() - t0,
            "sigma_mae": final["sigma_mae"], "oracle_sigma_mae": oracle,
            "oracle_bandwidth": best, "ratio": final["sigma_mae"] / oracle,
            "coverage_2sigma": final["coverage_2sigma"], "mean_rmse": final["mean_rmse"],
            "final_loss": nll, "test_crps": test["crps"], "test_mace": test["mace"],
            "test_coverage_2sigma": test["coverage_2sigma"]}


# The four targets, each a test of one run, in the order the summary counts their misses.
TARGETS = (lambda r: r["ratio"] <= MAX_RATIO,
           lambda r: COVERAGE[0] <= r["coverage_2sigma"] <= COVERAGE[1],
           lambda r: r["mean_rmse"] <= MAX_MEAN_RMSE,
           lambda r: r["seconds"] <= MAX_SECONDS)


def passes(run: dict) -> bool:
    return all(ok(run) for ok in TARGETS)


def summary(name: str, runs: list[dict]) -> str:
    """One table row: the spread over the seeds of each figure, and how many runs pass."""
    def span(key, fmt):
        v = [r[key] for r in runs]
        return f"{fmt.format(min(v))}-{fmt.format(max(v))}"

    return (f"| {name} | {span('ratio', '{:.2f}')} | {span('sigma_mae', '{:.4f}')} | "
            f"{span('coverage_2sigma', '{:.1%}')} | {span('mean_rmse', '{:.3f}')} | "
            f"{span('seconds', '{:.0f}')} | {span('test_crps', '{:.4f}')} | "
            f"{span('test_mace', '{:.3f}')} | {sum(passes(r) for r in runs)}/{len(runs)} | "
            f"{' / '.join(str(sum(not ok(r) for r in runs)) for ok in TARGETS)} |")


HEADER = ("| candidate | sigma MAE / oracle | sigma MAE | 2-sigma coverage | RMSE(mu, sin) | "
          "seconds | held-out CRPS | held-out MACE | pass | missed: ratio / coverage / RMSE / "
          "seconds |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def build_parser() -> argparse.ArgumentParser:
    p = options.Parser(prog="recipe_sweep.py", description="Train candidate recipes on fresh "
                       "synthetic draws and judge how well each recovers sigma(x).")
    p.add_argument("--candidates", default=",".join(c for c in CANDIDATES if c != "lecture-20k"),
                   help=f"comma-separated, of {', '.join(CANDIDATES)}, or 'calibrated' "
                   "(the recipe as shipped), kernel-H (the oracle's smoother at bandwidth H) "
                   "or truth (the law itself)")
    p.add_argument("--seeds", default="0-9",
                   help="comma-separated data seeds and ranges A-B, e.g. 0-9,42")
    p.add_argument("--framework", default="jax", choices=("jax", "torch"))
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--out", metavar="DIR", required=True)
    return p


MAX_SEEDS = 100_000


def parse_seeds(text: str) -> list[int]:
    """--seeds: comma-separated seeds and ranges A-B (both ends included)."""
    seeds: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            a = int(lo)
            b = int(hi) if sep else a
        except ValueError:
            raise UsageError(f"--seeds: expected comma-separated integers or ranges A-B, "
                             f"got {part!r}") from None
        if b < a:
            raise UsageError(f"--seeds: the range {part!r} is empty (its end is before its "
                             "start)")
        if len(seeds) + b - a + 1 > MAX_SEEDS:
            raise UsageError(f"--seeds: more than {MAX_SEEDS} seeds")
        seeds.extend(range(a, b + 1))
    if not seeds:
        raise UsageError("--seeds: names no seed")
    return seeds


def run(args) -> int:
    seeds = parse_seeds(args.seeds)
    names = [c.strip() for c in args.candidates.split(",") if c.strip()]
    table = {**CANDIDATES, "calibrated": dict(recipe="calibrated")}
    for name in names:
        if name == TRUTH or kernel_bandwidth(name) is not None:
            table[name] = {}  # trains nothing: the draw's own settings
        elif name not in table:
            raise UsageError(f"--candidates {name}: unknown; known: {', '.join(table)}, "
                             f"{KERNEL}H, {TRUTH}")
    outputs.check_out(args.out, overwrite=True)  # the sweep's files replace their namesakes
    # every run's settings, so that a bad one is refused here, not half way through
    planned = {(name, seed): Settings(framework=args.framework, preset="none", seed=seed,
                                      dtype=args.dtype, device="cpu", **table[name])
               for name in names for seed in seeds}
    os.makedirs(args.out, exist_ok=True)
    results: dict = {}
    lines = [HEADER]
    for name in names:
        runs = []
        for seed in seeds:
            runs.append(evaluate_reference(planned[name, seed], kernel_bandwidth(name))
                        if name == TRUTH or name.startswith(KERNEL)
                        else evaluate(planned[name, seed]))
            print(f"{name} seed {seed}: " + ", ".join(
                f"{k} {v:.4g}" for k, v in runs[-1].items() if isinstance(v, float)), flush=True)
            results[name] = {"options": table[name], "runs": runs}
            outputs.write_json(os.path.join(args.out, "sweep.json"), results)  # as it goes
        lines.append(summary(name, runs))
        print(lines[-1], flush=True)
    with open(os.path.join(args.out, "sweep.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    return options.main(build_parser(), run, argv)
