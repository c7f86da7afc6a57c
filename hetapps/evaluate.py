"""The evaluate command (`python scripts/evaluate.py`, `jaxhet-evaluate`): an interchange
file, of either framework's making, evaluated on data in either framework.

It writes into --out: metrics.json (`metrics`: the scores, calibration metrics and
coverage of hetcore.metrics, and sigma_mae for synthetic data; `framework`, `device`,
`data`, `weights`), predictions.csv (`x,y,mu,sigma`), and the fit and calibration figures.
An ensemble's stacked file (a leading member axis on every tensor) is evaluated as its
members' Gaussian mixture, each member's own metrics under `members`.
Exit 0 on success, 2 on bad usage or input (one line, nothing written).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from hetapps import options, registry
from hetapps.train import write_fit_files
from hetcore import checkpoint, data, hostmem, interchange, metrics, outputs
from hetcore.errors import UsageError
from hetcore.settings import BACKENDS, DEVICES, PRESETS, Settings, check_predict_memory

SPLITS = ("train", "held-out")
# Points predicted per call: memory stays bounded for any N (65536 x 512 float32 is 128 MiB
# a layer) and the host is spared page faults of GBs of activations. Rows are independent;
# the batched predictions equal one pass to float32 rounding (a product of fewer rows may
# take another kernel), bit for bit as measured at this size. docs/performance.md has the
# times.
PREDICT_BATCH = 65536


def build_parser() -> argparse.ArgumentParser:
    p = options.Parser(
        prog="evaluate.py",
        description="Evaluate a weights file (safetensors, either framework's) on data: "
        "proper scores, calibration and coverage, predictions, fit and calibration figures.")
    p.add_argument("--weights", metavar="FILE", required=True,
                   help="interchange file (width, depth and dtype are read from it)")
    p.add_argument("--data", metavar="PATH", help=".npz with arrays x and y, or .csv with "
                   "header x,y (default: the synthetic draw that --preset, --seed and "
                   "--n-points say)")
    p.add_argument("--preset", choices=PRESETS, default=None,
                   help="without --data: whose law to draw (default: lecture)")
    p.add_argument("--seed", type=int, default=None, help="without --data: the draw's seed "
                   "(default: the preset's)")
    p.add_argument("--n-points", type=int, default=None,
                   help="without --data: points of the draw (default: 500)")
    p.add_argument("--split", choices=SPLITS, default=None, help="without --data: the "
                   "training draw (train, the default) or the held-out draw a training run "
                   "on these settings evaluates on")
    p.add_argument("--framework", choices=BACKENDS, default="jax",
                   help="which framework predicts (default jax)")
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="auto takes the best device present (default auto)")
    p.add_argument("--out", metavar="DIR", help="output directory (default: a new one under runs/)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an evaluation or run already in --out")
    return p


def dataset_for(args: argparse.Namespace, dtype: str) -> data.Dataset:
    """The data to evaluate on: the --data file, or the synthetic draw the options say."""
    synthetic = {k: v for k, v in (("preset", args.preset), ("seed", args.seed),
                                   ("n_points", args.n_points), ("split", args.split))
                 if v is not None}
    if args.data is not None:
        if synthetic:
            raise UsageError(f"{options.flag(next(iter(synthetic)))}: describes a synthetic "
                             "draw, which --data replaces; give one or the other")
        return data.read(args.data, dtype)
    synthetic.pop("split", None)
    settings = Settings(dtype=dtype, **synthetic)
    training = data.for_settings(settings)
    if args.split == "held-out":
        return data.held_out(settings, training)
    return training


def predict(backend, weights: dict, x: np.ndarray, device: str) -> tuple[np.ndarray, np.ndarray]:
    """(mu, var) at x (N, 1), PREDICT_BATCH points at a time; the last batch is padded to
    the batch size (its last point repeated), so that JAX compiles one program."""
    if x.shape[0] <= PREDICT_BATCH:
        mu, var, _ = backend.predict(weights, x, device)
        return np.asarray(mu)[:, 0], np.asarray(var)[:, 0]
    mus, vars_ = [], []
    for start in range(0, x.shape[0], PREDICT_BATCH):
        part = x[start:start + PREDICT_BATCH]
        n = part.shape[0]
        if n < PREDICT_BATCH:
            part = np.concatenate([part, np.repeat(part[-1:], PREDICT_BATCH - n, 0)])
        mu, var, _ = backend.predict(weights, part, device)
        mus.append(np.asarray(mu)[:n, 0])
        vars_.append(np.asarray(var)[:n, 0])
    return np.concatenate(mus), np.concatenate(vars_)


def run(args: argparse.Namespace) -> int:
    out = outputs.default_out(f"evaluate-{args.framework}") if args.out is None else args.out
    outputs.check_out(out, args.overwrite, (args.weights, args.data))
    weights, width, depth, dtype, members = interchange.read_model(args.weights)
    meta = interchange.read_metadata(args.weights)
    constant = interchange.constant_sigma(meta, members, f"--weights {args.weights}")
    host_malloc = hostmem.keep_freed_memory()  # before a framework allocates anything
    backend = registry.backend(args.framework)
    device = backend.resolve_device(args.device)

    def check_fits(n: int, label: str) -> None:
        # the data, the predictions (each member's too) and one batch's forward pass
        held = (64 + 16 * (members or 0)) * n
        capacity = backend.memory_bytes(device)
        if held > capacity:
            raise UsageError(f"{label}: {n} points and their predictions need about "
                             f"{held / 2**30:.1f} GiB, more than the {capacity / 2**30:.1f} "
                             f"GiB of {backend.describe(device)}")
        check_predict_memory(width, depth, dtype, min(n, PREDICT_BATCH), capacity - held,
                             backend.describe(device), label)

    if args.data is None and args.n_points is not None:
        check_fits(args.n_points, "--n-points")  # before drawing the points
    dataset = dataset_for(args, dtype)
    x, y = dataset.columns(dtype)
    check_fits(x.shape[0], f"--data {args.data}" if args.data else "the synthetic draw")
    t0 = time.perf_counter()
    each = None
    if members is None:
        mu, var = predict(backend, weights, x, args.device)
        if constant is not None:  # an MSE run's weights: the sigma it reported, at every x
            var = np.full_like(var, constant[0] ** 2)
    else:  # an ensemble: each member's Gaussians, then their mixture
        each = [predict(backend, w, x, args.device) for w in interchange.unstack(weights)]
        if constant is not None:  # an MSE ensemble's: each member's sigma
            each = [(m, np.full_like(v, c ** 2)) for (m, v), c in zip(each, constant)]
        mu, var = metrics.mixture([m for m, _ in each], [v for _, v in each])
    predict_s = time.perf_counter() - t0
    name = os.path.basename(args.weights)
    title = f"{args.framework} on {backend.describe(device)}: {name} ({dtype})"
    with outputs.staged(out) as stage:
        t0 = time.perf_counter()
        evaluated = write_fit_files(stage, title, dataset, x, y, mu, var, members=each,
                                    label=f"data: {dataset.source}")
        metrics_s = time.perf_counter() - t0
        report = {
            "metrics": evaluated["final"],
            "framework": args.framework,
            "device": backend.describe(device),
            "dtype": dtype,
            "data": dataset.source,
            "data_sha256": checkpoint.data_digest(x, y),
            "n_points": int(x.shape[0]),
            "weights": os.path.abspath(args.weights),
            "weights_metadata": meta,
            "architecture": {"width": width, "depth": depth, "members": members},
            "timing": {"predict_s": predict_s, "metrics_and_figures_s": metrics_s},
            "host_malloc": host_malloc,
            "versions": backend.versions(),
        }
        if each is not None:
            report["members"] = evaluated["members"]
        outputs.write_json(os.path.join(stage, "metrics.json"), report)
        outputs.write_predictions(os.path.join(stage, "predictions.csv"), x, mu,
                                  np.sqrt(var.astype(np.float64)), y=y)
    m = evaluated["final"]
    line = (f"{args.framework} {backend.describe(device)} {dtype}: {x.shape[0]} points, nll "
            f"{m['nll_full']:.4f}  crps {m['crps']:.4f}  mace {m['mace']:.4f}  coverage 2 "
            f"sigma {m['coverage_2sigma']:.1%}")
    if "sigma_mae" in m:
        line += f"  sigma_mae {m['sigma_mae']:.4f}"
    print(line)
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return options.main(build_parser(), run, argv, interrupted="interrupted; nothing "
                        "written to --out")
