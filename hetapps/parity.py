"""The parity command (`python scripts/parity.py`, `jaxhet-parity`): verify jaxhet against
torchhet.

For each dtype asked for, from one set of data and initial weights shared by both
frameworks, it compares: the interchange file's round trip; forward outputs, loss and every
gradient; one SGD step; the whole run's loss per epoch, final weights and the fitted band
on a dense grid, the last three against the one-ulp floor (hetcore.criteria); the metrics
of both runs' predictions on the training data and the held-out data (hetcore.metrics),
each within the reach of predictions as far apart as the band checks allow; and, in
float32, each run's distance from the float64 reference. It prints a table, writes
`parity.json` and `parity.png`/`.svg` into `--out`, and exits 0 when every check passes,
1 when one fails, 2 on bad usage or bad input (nothing written then).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

from hetapps import options, registry
from hetcore import criteria, data, driver, figures, interchange, metrics, outputs
from hetcore.errors import UsageError
from hetcore.settings import BACKENDS, Settings, check_memory, check_predict_memory

INITS = ("torch", "jax")
DTYPE_CHOICES = ("float32", "float64", "both")
DEFAULT_FLOOR_RUNS = 2
DEFAULT_GRID_POINTS = 1001
# Each twin run is a whole training run; a band's grid is predicted in one call per
# framework. Past these bounds a request is a mistake, refused before any work.
MAX_FLOOR_RUNS = 100
MAX_GRID_POINTS = 10**6


def build_parser() -> argparse.ArgumentParser:
    p = options.Parser(
        prog="parity.py",
        description="Verify that jaxhet and torchhet agree from the same data and initial "
        "weights: forward, loss, gradients, one SGD step, the whole run and the fitted "
        "band, in float32 and float64. Exit 0: all checks pass; 1: a check failed; 2: bad "
        "usage or input.",
    )
    # --devices: each framework's data-parallel run is checked against its one-device run
    # (tests/test_devices.py), not across frameworks here.
    options.add_settings(p, exclude=("framework", "dtype", "checkpoint_every", "devices"))
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="both",
                   help="both (default): float32 and float64; the float64 runs then start "
                   "from the float32 data and weights cast exactly, so that they are the "
                   "float32 runs' reference")
    p.add_argument("--init", choices=INITS, default="torch",
                   help="which framework draws the initial weights when neither the preset nor "
                   "--init-from gives them (default torch)")
    p.add_argument("--floor-runs", type=int, default=DEFAULT_FLOOR_RUNS,
                   help="one-ulp twin runs per framework and dtype (default 2)")
    p.add_argument("--grid-points", type=int, default=DEFAULT_GRID_POINTS,
                   help="points of the dense grid on which the fitted bands are compared")
    p.add_argument("--out", metavar="DIR", help="output directory (default: a new one under runs/)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a parity report already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


@dataclass
class Inputs:
    """Everything a verification uses, resolved and checked before any training."""

    settings: dict[str, Settings]  # by dtype
    dataset: data.Dataset
    xy: dict[str, tuple[np.ndarray, np.ndarray]]  # by dtype: (N, 1) columns
    weights: dict[str, dict[str, np.ndarray]]  # by dtype
    weights_source: str
    grid: dict[str, np.ndarray]  # by dtype: (G, 1)
    modules: dict = field(default_factory=dict)
    held_out: dict = field(default_factory=dict)  # by dtype: (x, y) (M, 1), when there are
    held_source: str | None = None


def _file_weights(path: str, width: int, depth: int, ensemble: int = 1) -> tuple[dict, str]:
    """An interchange file of either dtype, checked against the architecture (an
    ensemble's: stacked, a leading member axis of `ensemble`)."""
    state = interchange.read(path)
    dtypes = sorted({str(a.dtype) for a in state.values()})
    label = f"--init-from {path}"
    for name, a in state.items():
        if str(a.dtype) not in criteria.DTYPES:
            raise UsageError(f"{label}: tensor '{name}' is {a.dtype}, expected float32 or float64")
    if len(dtypes) > 1:
        raise UsageError(f"{label}: tensors mix dtypes {', '.join(dtypes)}")
    dtype = dtypes[0] if dtypes else "float32"
    if ensemble > 1:
        interchange.check_stacked(state, ensemble, width, depth, dtype, label=label)
    else:
        interchange.check(state, width, depth, dtype, label=label)
    return state, os.path.abspath(path)


def resolve(args: argparse.Namespace, modules: dict | None = None) -> Inputs:
    """Check every option, read the data and weights, import both frameworks.

    Raises UsageError (one line) on anything wrong, before any training.
    """
    dtypes = ["float32", "float64"] if args.dtype == "both" else [args.dtype]
    if isinstance(args.floor_runs, bool) or not 1 <= args.floor_runs <= MAX_FLOOR_RUNS:
        raise UsageError(f"--floor-runs: must be from 1 to {MAX_FLOOR_RUNS}, got "
                         f"{args.floor_runs}")
    if not 2 <= args.grid_points <= MAX_GRID_POINTS:
        raise UsageError(f"--grid-points: must be from 2 to {MAX_GRID_POINTS:,}, got "
                         f"{args.grid_points}")
    base = options.settings(args, framework="both", dtype=dtypes[0])
    modules = modules or {n: registry.backend(n) for n in BACKENDS}
    devices = {n: m.resolve_device(base.device)  # unavailable: usage error, before any work
               for n, m in modules.items()}

    def check_fits(n_points: int) -> None:  # in the wider dtype, as the train command does
        for n, m in modules.items():
            capacity, where = m.memory_bytes(devices[n]), m.describe(devices[n])
            check_memory(base.replace(dtype=dtypes[-1]), n_points, capacity, where)
            # the bands are predicted on the grid (and the held-out draw) in one call
            check_predict_memory(base.width, base.depth, dtypes[-1],
                                 max(args.grid_points, n_points), capacity, where,
                                 f"--grid-points {args.grid_points}")

    if base.data is None:
        check_fits(base.n_points)  # before drawing the points
    dataset = data.for_settings(base)  # checks finiteness in dtypes[0], the narrower one
    check_fits(len(dataset.x))
    if base.init_from is not None and len(dtypes) > 1:
        w0, source = _file_weights(base.init_from, base.width, base.depth, base.ensemble)
    else:
        w0, source = driver.initial_weights(base, modules[args.init])
    x0, y0 = dataset.columns(dtypes[0])
    base.check_run(len(x0))  # a warm-up the run would not outlast: before any work
    w0 = interchange.cast(w0, dtypes[0])
    for name, a in w0.items():  # a float64 file may overflow float32
        if not np.isfinite(a).all():
            raise UsageError(f"--init-from {base.init_from}: tensor '{name}' is not finite "
                             f"in {dtypes[0]}")
    lo, hi = float(np.min(x0)), float(np.max(x0))
    if hi == lo:
        lo, hi = lo - 1.0, hi + 1.0
    grid = np.linspace(lo, hi, args.grid_points).reshape(-1, 1)  # (G, 1)
    held = data.held_out(base, dataset)
    held_xy = None if held is None else held.columns(dtypes[0])
    settings, xy, weights, grids, held_out = {}, {}, {}, {}, {}
    for dt in dtypes:
        settings[dt] = base.replace(dtype=dt)
        xy[dt] = (x0.astype(dt), y0.astype(dt))  # float64 from float32: exact
        weights[dt] = interchange.cast(w0, dt)
        grids[dt] = grid.astype(dt)
        if held_xy is not None:
            held_out[dt] = tuple(a.astype(dt) for a in held_xy)
    return Inputs(settings, dataset, xy, weights, source, grids, modules, held_out,
                  None if held is None else held.source)


def _log(quiet: bool, msg: str) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def _roundtrip_check(weights: dict, dtype: str) -> criteria.Check:
    """The interchange file reproduces every tensor bit for bit (and its dtype)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "w.safetensors")
        interchange.write(path, weights)
        back = interchange.read(path)
    bad = [n for n in weights
           if n not in back or back[n].dtype != weights[n].dtype
           or back[n].shape != weights[n].shape
           or back[n].tobytes() != np.ascontiguousarray(weights[n]).tobytes()]
    bad += [n for n in back if n not in weights]
    return criteria.Check(
        "interchange round trip", dtype, 0.0 if not bad else float("inf"), 0.0, 0.0,
        not bad, "file", f"{len(weights)} tensors" + (f", differs: {bad[0]}" if bad else
                                                      " bit for bit"),
        "a round trip must reproduce every bit", "single-step",
    )


def _grid_predictions(module, result, grid, device, mse: bool
                      ) -> tuple[np.ndarray, np.ndarray]:
    """mu and sigma of a run's final weights on the grid (an MSE run's sigma: its one
    value, the training residuals' RMS, driver.train's); an ensemble's: its members'
    mixture (of one model, the model itself, exactly)."""
    mu, var = metrics.mixture(*driver.member_predictions(module, result, grid, device, mse))
    return mu, np.sqrt(var)


def _members(w: dict, ensemble: int) -> list[tuple[str, dict]]:
    """(label prefix, state dict) of each model the single-step checks take: the one
    model, or each member of an ensemble."""
    if ensemble == 1:
        return [("", w)]
    return [(f"member {k}: ", m) for k, m in enumerate(interchange.unstack(w))]


def verify_dtype(inp: Inputs, dtype: str, floor_runs: int, quiet: bool = True,
                 reference: dict | None = None) -> dict:
    """All checks for one dtype. Returns checks, curves and the runs' summaries.

    reference: the float64 section of the same verification (its runs start from the same
    data and weights, cast exactly), used for the float32 runs' distance checks.
    """
    s = inp.settings[dtype]
    x, y = inp.xy[dtype]
    w = inp.weights[dtype]
    grid = inp.grid[dtype]
    mods = inp.modules
    dev = s.device
    one = criteria.SINGLE_STEP[dtype]
    checks = [_roundtrip_check(w, dtype)]
    t0 = time.perf_counter()

    # Single-step quantities (an ensemble's: each member's).
    _log(quiet, f"[{dtype}] forward, loss, gradients, one SGD step")
    for label, wk in _members(w, s.ensemble):
        fwd = {n: m.predict(wk, x, dev, s.full, y, s.loss, s.beta) for n, m in mods.items()}
        for i, q in enumerate(("mu", "var", "loss")):
            checks.append(criteria.check_close(label + q, fwd["jax"][i], fwd["torch"][i], one,
                                               dtype))
        lg = {n: m.loss_and_grad(wk, x, y, dev, s.full, s.loss, s.beta)
              for n, m in mods.items()}
        checks.append(criteria.check_close(label + "loss (from loss_and_grad)", lg["jax"][0],
                                           lg["torch"][0], one, dtype))
        checks += criteria.check_states(label + "grad", lg["jax"][1], lg["torch"][1], one,
                                        dtype)
    # One epoch of the run's optimiser and batches at its peak learning rate: its warm-up
    # would make the first update a no-op, and its cosine needs the whole run's length.
    first_epoch = s.replace(epochs=1, schedule="constant", warmup_steps=0, lr_end=None)
    step = {n: driver.train(m, first_epoch, x, y, w) for n, m in mods.items()}
    checks += criteria.check_states("one SGD step", step["jax"].weights, step["torch"].weights,
                                  one, dtype)

    # The whole run and its one-ulp twins.
    runs, twins = {}, {n: [] for n in mods}
    for n, m in mods.items():
        _log(quiet, f"[{dtype}] {n}: {s.epochs} epochs, then {floor_runs} one-ulp twin(s)")
        runs[n] = driver.train(m, s, x, y, w, held_out=inp.held_out.get(dtype))
        for k in range(floor_runs):
            twins[n].append(driver.train(m, s, x, y, criteria.ulp_perturb(w, seed=k)))
    floor_gaps = [criteria.gap(runs[n].loss_history, t.loss_history)
                  for n in mods for t in twins[n]]
    fixed = criteria.FLOAT64_TRAJECTORY.tol if dtype == "float64" else 0.0
    loss_check, curves = criteria.floor_check(
        "loss per epoch", runs["jax"].loss_history, runs["torch"].loss_history, floor_gaps,
        dtype, fixed=fixed)
    checks += criteria.phase_checks(loss_check, curves)
    for k in range(s.ensemble if s.ensemble > 1 else 0):  # each member's own losses
        member = lambda r: r.member_losses[:, k]  # noqa: E731
        check, _ = criteria.floor_check(
            f"member {k}: loss per epoch", member(runs["jax"]), member(runs["torch"]),
            [criteria.gap(member(runs[n]), member(t)) for n in mods for t in twins[n]],
            dtype, fixed=fixed)
        checks.append(check)
    for name in runs["jax"].weights:
        pairs = [(runs[n].weights[name], t.weights[name]) for n in mods for t in twins[n]]
        checks.append(criteria.final_floor_check(
            f"final {name}", runs["jax"].weights[name], runs["torch"].weights[name], pairs,
            dtype, fixed=fixed))
    mse = s.loss == "mse"
    band = {n: _grid_predictions(m, runs[n], grid, dev, mse) for n, m in mods.items()}
    twin_band = {n: [_grid_predictions(m, t, grid, dev, mse) for t in twins[n]]
                 for n, m in mods.items()}
    band_bounds = []
    for i, q in ((0, "mu"), (1, "sigma")):
        pairs = [(band[n][i], tb[i]) for n in mods for tb in twin_band[n]]
        checks.append(criteria.final_floor_check(
            f"{q} on the grid ({grid.shape[0]} points)", band["jax"][i], band["torch"][i],
            pairs, dtype, fixed=fixed))
        band_bounds.append(checks[-1].bound)
    # The metrics, each within the reach of predictions as far apart as the band checks
    # allow.
    held = inp.held_out.get(dtype)
    b_mu, b_sigma = band_bounds
    checks += criteria.run_metric_checks(
        runs["jax"], runs["torch"], y, None if held is None else held[1], b_mu, b_sigma,
        f"bound: the reach of predictions within the band checks' bounds (mu {b_mu:.3g}, "
        f"sigma {b_sigma:.3g})")

    ref_curves = {}
    if reference is not None:
        ref = np.asarray(reference["curves"]["loss_torch"], np.float64)
        all_twins = [t.loss_history for n in mods for t in twins[n]]
        for n, other in (("jax", "torch"), ("torch", "jax")):
            c, rc = criteria.reference_check(n, runs[n].loss_history,
                                           [runs[other].loss_history] + all_twins, ref, dtype,
                                           own_twins=[t.loss_history for t in twins[n]])
            checks += criteria.phase_checks(c, rc)
            ref_curves[f"distance_{n}"] = rc["distance"]
        ref_curves["distance_twins"] = [criteria.gap(t, ref) for t in all_twins]

    return {
        "dtype": dtype,
        "pass": not criteria.failures(checks),
        "checks": checks,
        "seconds": time.perf_counter() - t0,
        "loss_check": loss_check,
        "compare": criteria.compare(runs["jax"], runs["torch"]),
        "devices": {n: r.device for n, r in runs.items()},
        "loops": {n: r.loop for n, r in runs.items()},
        "curves": {
            "loss_jax": runs["jax"].loss_history, "loss_torch": runs["torch"].loss_history,
            "gap": curves["gap"], "floor": curves["floor"], "bound": curves["bound"],
            "floor_gaps": floor_gaps, **ref_curves,
        },
        "grid": {"x": grid[:, 0], "mu_jax": band["jax"][0], "sigma_jax": band["jax"][1],
                 "mu_torch": band["torch"][0], "sigma_torch": band["torch"][1]},
        "data": {"x": x[:, 0], "y": y[:, 0]},
    }


def _reference_run(inp: Inputs, quiet: bool) -> dict:
    """A float64 torch run from the float32 data and weights (cast exactly): the reference
    of a float32-only verification."""
    s = inp.settings["float32"].replace(dtype="float64")
    x, y = (a.astype("float64") for a in inp.xy["float32"])
    w = interchange.cast(inp.weights["float32"], "float64")
    _log(quiet, "[float64] torch reference run")
    r = driver.train(inp.modules["torch"], s, x, y, w)
    return {"curves": {"loss_torch": r.loss_history}}


def verify(inp: Inputs, floor_runs: int = DEFAULT_FLOOR_RUNS, quiet: bool = True) -> dict:
    """Every dtype's checks; float64 first, so that float32 can use it as reference."""
    sections = {}
    if "float64" in inp.settings:
        sections["float64"] = verify_dtype(inp, "float64", floor_runs, quiet)
    if "float32" in inp.settings:
        ref = sections.get("float64") or _reference_run(inp, quiet)
        sections["float32"] = verify_dtype(inp, "float32", floor_runs, quiet, reference=ref)
    return sections


def _fmt(v: float) -> str:
    if np.isnan(v):
        return "-"  # not defined for the row (the relative size of a mean gap)
    return f"{v:.3g}" if np.isfinite(v) else str(v)


def table(sections: dict) -> str:
    """quantity | dtype | max abs | max rel | bound | pass, every check of every dtype."""
    rows = [("quantity", "dtype", "max abs", "max rel", "bound", "pass")]
    for sec in sections.values():
        for c in sec["checks"]:
            rows.append((c.quantity, c.dtype, _fmt(c.max_abs), _fmt(c.max_rel), _fmt(c.bound),
                         "yes" if c.ok else "NO"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(widths[i]) if i == 0 else v.rjust(widths[i])
                       for i, v in enumerate(r)) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def report(inp: Inputs, sections: dict, floor_runs: int) -> dict:
    """parity.json: settings, sources, bounds and their reasons, every check, the curves."""
    return outputs.jsonable({
        "pass": all(sec["pass"] for sec in sections.values()),
        "settings": {dt: s.to_dict() for dt, s in inp.settings.items()},
        "data_source": inp.dataset.source,
        "init_source": inp.weights_source,
        "floor_runs_per_framework": floor_runs,
        "bounds": {
            "single_step": {dt: {"tol": b.tol, "reason": b.reason}
                            for dt, b in criteria.SINGLE_STEP.items()},
            "float64_trajectory": {"tol": criteria.FLOAT64_TRAJECTORY.tol,
                                   "reason": criteria.FLOAT64_TRAJECTORY.reason},
            "floor_factor": {"value": criteria.FLOOR_FACTOR, "reason": criteria.FLOOR_FACTOR_REASON},
            "floor_lag_epochs": {"value": criteria.FLOOR_LAG, "reason": criteria.FLOOR_LAG_REASON},
            "decorrelated": {"value": criteria.DECORRELATED, "reason": criteria.DECORRELATED_REASON},
            "rounding_ulps": {"value": criteria.ROUNDING_ULPS, "reason": criteria.ROUNDING_REASON},
            "metrics": {"reason": criteria.METRICS_REASON},
        },
        "held_out_source": None if inp.held_source is None else inp.held_source,
        "dtypes": {
            dt: {
                "pass": sec["pass"],
                "seconds": sec["seconds"],
                "devices": sec["devices"],
                "loops": sec["loops"],
                "checks": [c.to_dict() for c in sec["checks"]],
                "failed": [c.message() for c in sec["checks"] if not c.ok],
                "loss_per_epoch": sec["loss_check"].to_dict(),
                "compare": sec["compare"],
                "curves": sec["curves"],
                "grid": sec["grid"],
            }
            for dt, sec in sections.items()
        },
    })


def figure(sections: dict):
    """One row per dtype: loss curves, gap per epoch with the one-ulp floor, both bands."""
    rows = list(sections.values())
    fig, axes = figures.plt.subplots(len(rows), 3, figsize=(16, 4.6 * len(rows)), dpi=110,
                                     squeeze=False)
    for sec, row in zip(rows, axes):
        c, g = sec["curves"], sec["grid"]
        figures.parity_figure(
            None, None, None, axes=row, dtype=sec["dtype"],
            loss=(c["loss_jax"], c["loss_torch"]), floor_gaps=c["floor_gaps"],
            bound=c["bound"],
            reference=({"jax": c["distance_jax"], "torch": c["distance_torch"]}
                       if "distance_jax" in c else None),
            band={k: g[k] for k in ("x", "mu_jax", "sigma_jax", "mu_torch", "sigma_torch")},
            data=(sec["data"]["x"], sec["data"]["y"]),
        )
    fig.suptitle("jax vs torch: " + ", ".join(
        f"{sec['dtype']} {'pass' if sec['pass'] else 'FAIL'}" for sec in rows))
    fig.tight_layout()
    return fig


def run(args: argparse.Namespace) -> int:
    out = outputs.default_out("parity") if args.out is None else args.out
    outputs.check_out(out, args.overwrite,
                      (getattr(args, "data", None), getattr(args, "init_from", None)))
    inp = resolve(args)
    sections = verify(inp, args.floor_runs, args.quiet)
    rep = report(inp, sections, args.floor_runs)
    fig = figure(sections)
    with outputs.staged(out) as stage:
        outputs.write_json(os.path.join(stage, "parity.json"), rep)
        figures.save(fig, os.path.join(stage, "parity"))
    print(table(sections))
    for sec in sections.values():
        for c in criteria.failures(sec["checks"]):
            print("FAIL " + c.message())
        info = sec["loss_check"].info
        phase = ("the one-ulp twins stay correlated throughout" if info["decorrelated_from"] is None
                 else f"the one-ulp twins decorrelate from epoch {info['decorrelated_from']}")
        print(f"{sec['dtype']}: {'pass' if sec['pass'] else 'FAIL'} in {sec['seconds']:.1f} s; "
              f"loss per epoch: {phase}; largest gap/bound while correlated "
              f"{info['worst_ratio_correlated']:.2g} (epoch {info['worst_ratio_epoch']}), "
              f"gap/floor-alone bound {info['worst_ratio_floor_only']:.2g}")
    print(f"wrote {out}")
    return 0 if rep["pass"] else 1


def main(argv: list[str] | None = None) -> int:
    return options.main(build_parser(), run, argv)
