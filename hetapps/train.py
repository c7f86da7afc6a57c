"""The train command (`python scripts/train.py`, `jaxhet-train`): parse, check everything,
train through the run driver, write the run directory whole or not at all."""

from __future__ import annotations

import argparse
import os

import numpy as np

from hetapps import options, registry
from hetcore import checkpoint, criteria, data, driver, figures, hostmem, interchange, outputs
from hetcore.driver import RunResult
from hetcore.errors import UsageError
from hetcore.metrics import final_metrics
from hetcore.settings import Settings, check_memory


def build_parser() -> argparse.ArgumentParser:
    p = options.Parser(
        prog="train.py",
        description="Train the lecture's heteroscedastic regression (mean and variance heads, "
        "Gaussian NLL, full-batch SGD) in JAX, PyTorch or both.",
    )
    options.add_settings(p)
    p.add_argument("--out", metavar="DIR", help="output directory (default: a new one under runs/)")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.add_argument("--resume", metavar="DIR",
                   help="continue the run in DIR from its checkpoints, with its own settings")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def write_run(stage_dir: str, result: RunResult, dataset: data.Dataset, x: np.ndarray,
              y: np.ndarray, config: dict) -> dict:
    """All files of one framework's run into `stage_dir`; returns the metrics."""
    os.makedirs(stage_dir, exist_ok=True)
    epochs = len(result.loss_history)
    metrics = {
        "config": config,
        "framework": result.framework,
        "device": result.device,
        "dtype": result.dtype,
        "loop": result.loop,
        "loss_history": [float(v) for v in result.loss_history],
        "final": final_metrics(y, result.mu, result.var, result.final_loss,
                               dataset.true_sigma(), dataset.true_mean()),
        "timing": {
            "compile_s": result.compile_s,
            "train_s": result.train_s,
            "epochs": epochs,
            "ms_per_epoch": 1e3 * result.train_s / epochs,
        },
        "versions": result.versions,
    }
    outputs.write_json(os.path.join(stage_dir, "metrics.json"), metrics)
    outputs.write_predictions(os.path.join(stage_dir, "predictions.csv"), x, result.mu,
                              result.sigma)
    meta = {"framework": result.framework, "dtype": result.dtype}
    interchange.write(os.path.join(stage_dir, "initial_weights.safetensors"),
                      result.initial_weights, meta)
    interchange.write(os.path.join(stage_dir, "weights.safetensors"), result.weights, meta)
    title = f"{result.framework} on {result.device}, {epochs} epochs ({result.dtype})"
    fig = figures.fit_figure(x[:, 0], y[:, 0], result.mu, result.sigma, title,
                             dataset.true_mean(), dataset.true_sigma())
    figures.save(fig, os.path.join(stage_dir, "fit"))
    return metrics


def summary(result: RunResult, metrics: dict) -> str:
    f, t = metrics["final"], metrics["timing"]
    line = (f"{result.framework:5s} {result.device} {result.dtype}: {t['epochs']} epochs in "
            f"{t['train_s']:.3f} s ({t['ms_per_epoch']:.3f} ms/epoch), compile {t['compile_s']:.2f} s"
            f"\n      final loss {f['loss']:.6f}  rmse {f['rmse']:.4f}  coverage 1/2/3 sigma "
            f"{f['coverage_1sigma']:.1%} / {f['coverage_2sigma']:.1%} / {f['coverage_3sigma']:.1%}")
    if "sigma_mae" in f:
        line += f"  sigma_mae {f['sigma_mae']:.4f}"
    return line


def resume_plan(args: argparse.Namespace):
    """(settings, out, checkpoints by framework) for `--resume DIR`: the run keeps its own
    settings; --device alone may change (the run moves to another device), and any other
    option given must say what the checkpoint says."""
    out = args.resume
    if args.out is not None and os.path.abspath(args.out) != os.path.abspath(out):
        raise UsageError(f"--resume {out}: the run continues in its own directory; drop --out")
    ckpts = checkpoint.find(out)
    saved = Settings(**next(iter(ckpts.values())).settings)
    given = options.given(args)
    for name, value in given.items():
        if name != "device" and value != getattr(saved, name):
            raise UsageError(f"--resume {out}: {options.flag(name)} {value} differs from the "
                             f"checkpoint's {getattr(saved, name)}; the run keeps its own "
                             "settings")
    if any(os.path.exists(os.path.join(out, n)) for n in ("metrics.json", "parity.json")):
        raise UsageError(f"--resume {out}: the run there has finished already")
    return saved.replace(device=given.get("device", saved.device)), out, ckpts


def run(args: argparse.Namespace) -> int:
    ckpts: dict = {}
    if args.resume is not None:
        settings, out, ckpts = resume_plan(args)
    else:
        settings = options.settings(args)
        out = args.out or outputs.default_out(settings.framework)
        outputs.check_out(out, args.overwrite)
    names = registry.names(settings.framework)
    host_malloc = hostmem.keep_freed_memory()  # before a framework allocates anything
    backends = {n: registry.backend(n) for n in names}
    devices = {n: b.resolve_device(settings.device) for n, b in backends.items()}

    def check_fits(n_points: int) -> None:
        for n, b in backends.items():
            check_memory(settings, n_points, b.memory_bytes(devices[n]), b.describe(devices[n]))

    if settings.data is None:
        check_fits(settings.n_points)  # before drawing the points
    dataset = data.for_settings(settings)
    x, y = dataset.columns(settings.dtype)
    check_fits(x.shape[0])
    if ckpts:
        c = next(iter(ckpts.values()))
        weights, weights_source = c.initial_weights, c.extra.get("init_source", "checkpoint")
    else:
        weights, weights_source = driver.initial_weights(settings, backends[names[0]])
    config = {**settings.to_dict(), "data_source": dataset.source,
              "data_sha256": checkpoint.data_digest(x, y), "init_source": weights_source,
              "n_points_used": int(x.shape[0]), "host_malloc": host_malloc,
              "out": os.path.abspath(out),
              "resumed_from_epoch": {fw: c.epoch for fw, c in ckpts.items()}}

    results = {}
    for n, b in backends.items():
        results[n] = driver.train(
            b, settings, x, y, weights, progress=not args.no_progress, resume=ckpts.get(n),
            checkpoint_path=(os.path.join(out, checkpoint.filename(n))
                             if settings.checkpoint_every else None),
            checkpoint_extra={"init_source": weights_source})

    with outputs.staged(out) as stage:
        lines = []
        for n, r in results.items():
            where = os.path.join(stage, n) if len(results) > 1 else stage
            metrics = write_run(where, r, dataset, x, y, config)
            lines.append(summary(r, metrics))
        if len(results) == 2:
            report = criteria.compare(results["jax"], results["torch"])
            outputs.write_json(os.path.join(stage, "parity.json"), report)
            figures.save(figures.parity_figure(results["jax"], results["torch"], x),
                         os.path.join(stage, "parity"))
            lines.append(
                f"parity: max |loss gap| {report['loss_history']['max_abs']:.3g}, "
                f"max |sigma gap| {report['sigma']['max_abs']:.3g}"
            )
        if not settings.checkpoint_every:  # checkpoints of a run this one replaces
            for fw in registry.PACKAGES:
                stale = os.path.join(out, checkpoint.filename(fw))
                if os.path.exists(stale):
                    os.remove(stale)
    print("\n".join(lines))
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return options.main(build_parser(), run, argv, interrupted="interrupted; nothing "
                        "written to --out (checkpoints, if any, are kept)")
