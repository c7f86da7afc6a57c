"""The train command (`python scripts/train.py`, `jaxhet-train`): parse, check everything,
train through the run driver, write the run directory whole or not at all."""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from hetapps import launch, options, registry
from hetcore import checkpoint, criteria, data, driver, figures, hostmem, interchange, outputs
from hetcore.driver import RunResult
from hetcore.errors import ProcessFailed, TrainingDiverged, UsageError
from hetcore.metrics import EXPECTED, calibration_curve, final_metrics, mixture
from hetcore.settings import Settings, check_memory, check_predict_memory


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
    g = p.add_argument_group("jax over several processes (one per machine, say)")
    g.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address, where "
                   "the processes meet (jax.distributed); auto: from the cluster's "
                   "environment (SLURM, Open MPI, Cloud TPU)")
    g.add_argument("--num-processes", type=int, metavar="P", help="how many processes")
    g.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0 .. "
                   "P-1 (0 writes the run)")
    return p


def held_out_block(dataset: data.Dataset, x: np.ndarray, y: np.ndarray,
                   curve: np.ndarray | None = None) -> dict:
    """metrics.json's `held_out`: where the held-out data came from, and the held-out loss
    at each chunk's end."""
    block = {"source": dataset.source, "n_points": int(x.shape[0]),
             "sha256": checkpoint.data_digest(x, y)}
    if curve is not None:
        block["loss_at_chunk_ends"] = {"epochs": [int(e) for e in curve[0]],
                                       "loss": [float(v) for v in curve[1]]}
    return block


def write_fit_files(stage_dir: str, title: str, dataset: data.Dataset, x, y, mu, var,
                    held: tuple | None = None, members: list | None = None,
                    label: str = "training data") -> dict:
    """The metrics of predictions on data (and on held-out data), the fit and calibration
    figures; returns {"final": ..., "test": ...} (test only with held-out data).

    x, y: (N, 1) columns; mu, var: (N,) predictions there; held: (dataset, x, y, mu, var,
    loss) of held-out data, or None. The true mean and sigma are known for synthetic data.
    members: an ensemble's (mu_k, var_k) at x, (mu, var) being their mixture: `members` of
    the result holds each one's metrics, and the fit figure draws them faintly.
    label: what (x, y) are called in the figures.
    """
    sigma = np.sqrt(np.asarray(var, np.float64))
    out = {"final": final_metrics(y, mu, var, None, dataset.true_sigma(), dataset.true_mean())}
    curves = {label: (EXPECTED, calibration_curve(y, mu, sigma), out["final"])}
    held_fig = None
    if held is not None:
        hd, hx, hy, hm, hv, hl = held
        hs = np.sqrt(np.asarray(hv, np.float64))
        out["test"] = final_metrics(hy, hm, hv, hl, hd.true_sigma(), hd.true_mean())
        curves["held-out data"] = (EXPECTED, calibration_curve(hy, hm, hs), out["test"])
        held_fig = (hx[:, 0], hy[:, 0], hm, hs)
    drawn = None
    if members is not None:
        out["members"] = [final_metrics(y, mk, vk, None, dataset.true_sigma(),
                                        dataset.true_mean()) for mk, vk in members]
        drawn = [(mk, np.sqrt(np.asarray(vk, np.float64))) for mk, vk in members]
    figures.save(figures.fit_figure(x[:, 0], y[:, 0], mu, sigma, title, dataset.true_mean(),
                                    dataset.true_sigma(), held_out=held_fig, label=label,
                                    members=drawn),
                 os.path.join(stage_dir, "fit"))
    figures.save(figures.calibration_figure(curves, f"calibration: {title}"),
                 os.path.join(stage_dir, "calibration"))
    return out


BEYOND = 0.25  # the share of the data's span an ensemble's extrapolation grid reaches past each end
GRID_POINTS = 601


def extrapolation(backend, result: RunResult, settings: Settings, dataset: data.Dataset,
                  x: np.ndarray) -> dict:
    """An ensemble's predictions beyond its data: on a grid over the data's range widened
    by BEYOND of its span at each end, the mixture's and member 0's (standing for one
    model) mu and sigma, and, past the data's ends, their mean sigma and (synthetic data)
    mean error and the share of the grid whose true mean lies within 2 sigma."""
    lo, hi = float(np.min(x)), float(np.max(x))
    pad = BEYOND * (hi - lo if hi > lo else 1.0)
    grid = np.linspace(lo - pad, hi + pad, GRID_POINTS)
    mus, variances = driver.member_predictions(backend, result,
                                               grid.astype(settings.dtype)[:, None],
                                               settings.device, settings.loss == "mse")
    mix = mixture(mus, variances)
    preds = {"mixture": (mix[0], np.sqrt(mix[1])), "member_0": (mus[0], np.sqrt(variances[0]))}
    truth = dataset.true_mean_at(grid)
    out = (grid < lo) | (grid > hi)
    summary = {"x_range": [float(grid[0]), float(grid[-1])], "data_range": [lo, hi],
               "points_beyond": int(out.sum())}
    for name, (m, sd) in preds.items():
        block = {"mean_sigma": float(np.mean(sd[out]))}
        if truth is not None:
            err = np.abs(m - truth)[out]
            block |= {"mean_abs_error": float(np.mean(err)),
                      "true_mean_within_2sigma": float(np.mean(err <= 2 * sd[out]))}
        summary[name] = block
    return {"grid": grid, "predictions": preds, "true_mean": truth, "summary": summary}


def write_run(stage_dir: str, result: RunResult, dataset: data.Dataset, x: np.ndarray,
              y: np.ndarray, config: dict, held_out: tuple | None = None,
              beyond: dict | None = None) -> dict:
    """All files of one framework's run into `stage_dir`; returns the metrics.

    held_out: (dataset, x, y) of the run's held-out data (result.held_out predicts there),
    or None. beyond: an ensemble's extrapolation(), drawn as extrapolation.png/svg and
    summarised in metrics.json."""
    os.makedirs(stage_dir, exist_ok=True)
    epochs = len(result.loss_history)
    title = f"{result.framework} on {result.device}, {epochs} epochs ({result.dtype})"
    if result.members is not None:
        title = f"{title}, ensemble of {len(result.members.loss)}"
    held = None
    if held_out is not None:
        p = result.held_out
        held = (*held_out, p.mu, p.var, p.loss)
    ens = result.members  # an ensemble's members (driver.RunResult), else None
    evaluated = write_fit_files(stage_dir, title, dataset, x, y, result.mu, result.var, held,
                                None if ens is None else list(zip(ens.mu, ens.var)))
    metrics = {
        "config": config,
        "framework": result.framework,
        "device": result.device,
        "dtype": result.dtype,
        "loop": result.loop,
        "loss_history": [float(v) for v in result.loss_history],
        "final": {"loss": float(result.final_loss), **evaluated["final"]},
    }
    if held is not None:
        metrics["test"] = evaluated["test"]
        metrics["held_out"] = held_out_block(held_out[0], held_out[1], held_out[2],
                                             result.held_out_curve)
    if ens is not None:
        metrics["members"] = []
        for k, final in enumerate(evaluated["members"]):
            member = {"loss_history": [float(v) for v in result.member_losses[:, k]],
                      "final": {"loss": float(ens.loss[k]), **final}}
            if held is not None:
                hm = result.held_out_members
                member["test"] = final_metrics(held_out[2], hm.mu[k], hm.var[k],
                                               float(hm.loss[k]), held_out[0].true_sigma(),
                                               held_out[0].true_mean())
            metrics["members"].append(member)
    if beyond is not None:
        metrics["beyond_the_data"] = beyond["summary"]
        figures.save(figures.extrapolation_figure(
            x[:, 0], y[:, 0], beyond["grid"], beyond["predictions"]["mixture"],
            beyond["predictions"]["member_0"], f"beyond the data: {title}",
            beyond["true_mean"]), os.path.join(stage_dir, "extrapolation"))
    # A resumed run times the epochs it ran, not those its checkpoint already held (a
    # checkpoint of the final epoch runs none: no time an epoch to report).
    ran = epochs - result.resumed_at
    metrics |= {
        "timing": {
            "compile_s": result.compile_s,
            "train_s": result.train_s,
            "epochs": ran,
            "ms_per_epoch": 1e3 * result.train_s / ran if ran else None,
        },
        "versions": result.versions,
    }
    outputs.write_json(os.path.join(stage_dir, "metrics.json"), metrics)
    outputs.write_predictions(os.path.join(stage_dir, "predictions.csv"), x, result.mu,
                              result.sigma)
    if held is not None:
        outputs.write_predictions(os.path.join(stage_dir, "test_predictions.csv"),
                                  held_out[1], result.held_out.mu, result.held_out_sigma,
                                  y=held_out[2])
    meta = {"framework": result.framework, "dtype": result.dtype}
    interchange.write(os.path.join(stage_dir, "initial_weights.safetensors"),
                      result.initial_weights, meta)
    if config.get("loss") == "mse":  # the variance head was never trained (driver.train)
        meta[interchange.CONSTANT_SIGMA] = (
            float(result.sigma[0]) if ens is None
            else [float(np.sqrt(np.float64(v[0]))) for v in ens.var])  # each member's
    interchange.write(os.path.join(stage_dir, "weights.safetensors"), result.weights, meta)
    figures.save(figures.loss_figure(result.loss_history, f"loss: {title}",
                                     result.held_out_curve if held is not None else None),
                 os.path.join(stage_dir, "loss"))
    return metrics


def summary(result: RunResult, metrics: dict) -> str:
    f, t = metrics["final"], metrics["timing"]
    rate = "" if t["ms_per_epoch"] is None else f" ({t['ms_per_epoch']:.3f} ms/epoch)"
    resumed = f" (resumed at epoch {result.resumed_at})" if result.resumed_at else ""
    line = (f"{result.framework:5s} {result.device} {result.dtype}: {t['epochs']} epochs"
            f"{resumed} in {t['train_s']:.3f} s{rate}, compile {t['compile_s']:.2f} s"
            f"\n      final loss {f['loss']:.6f}  rmse {f['rmse']:.4f}  coverage 1/2/3 sigma "
            f"{f['coverage_1sigma']:.1%} / {f['coverage_2sigma']:.1%} / {f['coverage_3sigma']:.1%}")
    if "sigma_mae" in f:
        line += f"  sigma_mae {f['sigma_mae']:.4f}"
    line += f"  crps {f['crps']:.4f}  mace {f['mace']:.4f}"
    if "test" in metrics:
        h = metrics["test"]
        line += (f"\n      held-out: loss {h['loss']:.6f}  crps {h['crps']:.4f}  mace "
                 f"{h['mace']:.4f}  coverage 2 sigma {h['coverage_2sigma']:.1%}")
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


def held_out_data(settings: Settings, dataset: data.Dataset, backends: dict, devices: dict
                  ) -> tuple | None:
    """(dataset, x, y) of the run's held-out data (hetcore.data.held_out), checked to fit
    each framework's device for predicting; None without held-out data."""
    held = data.held_out(settings, dataset)
    if held is None:
        return None
    hx, hy = held.columns(settings.dtype)
    for n, b in backends.items():
        check_predict_memory(settings.width, settings.depth, settings.dtype, hx.shape[0],
                             b.memory_bytes(devices[n]), b.describe(devices[n]),
                             "--test-data" if settings.test_data else "the held-out draw")
    return held, hx, hy


def run(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """The train command on parsed `args`; `argv`, the command line they came from, is
    what the workers of a torch run over several processes are started with."""
    if args.coordinator is not None and not launch.supervised():
        # one process of a jax run over several: in a child, whose abort on a lost peer
        # becomes one line here (hetapps.launch.supervise)
        return launch.supervise(list(argv or []), args.process_id, args.num_processes)
    ckpts: dict = {}
    if args.resume is not None:
        settings, out, ckpts = resume_plan(args)
        missing = [n for n in registry.names(settings.framework) if n not in ckpts]
        if missing:  # (a run stopped between the frameworks' checkpoints)
            print(f"--resume {out}: no checkpoint of {missing[0]} there; {missing[0]} trains "
                  "from the first epoch, from the run's initial weights", flush=True)
    else:
        settings = options.settings(args)
        out = outputs.default_out(settings.framework) if args.out is None else args.out
    settings = launch.torchrun_world(settings, options.given(args))
    # Process 0 writes the run, and alone checks where (every process knows its index
    # before it waits for the others, so that a refusal comes before any wait).
    hinted = launch.worker_rank() if launch.worker_rank() is not None else args.process_id
    if args.resume is None and not hinted:
        outputs.check_out(out, args.overwrite,
                          (settings.data, settings.test_data, settings.init_from))
    names = registry.names(settings.framework)
    host_malloc = hostmem.keep_freed_memory()  # before a framework allocates anything
    backends = {n: registry.backend(n) for n in names}
    # torch over several processes without torchrun: this process starts them (below).
    starts_workers = (settings.framework == "torch" and settings.devices > 1
                      and launch.worker_rank() is None)
    cluster = {"coordinator": args.coordinator, "num_processes": args.num_processes,
               "process_id": args.process_id}
    rank, processes = 0, 1
    for b in backends.values():  # (torch, about to start its workers: checks their count)
        rank, processes = b.join(settings, cluster)
    if processes > 1:
        launch.joined()
    devices = {n: b.resolve_device(settings.device) for n, b in backends.items()}

    def check_fits(n_points: int) -> None:
        for n, b in backends.items():
            check_memory(settings, n_points, b.memory_bytes(devices[n]), b.describe(devices[n]))

    if settings.data is None:
        check_fits(settings.n_points)  # before drawing the points
    dataset = data.for_settings(settings)
    x, y = dataset.columns(settings.dtype)
    check_fits(x.shape[0])
    held_out = held_out_data(settings, dataset, backends, devices)
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

    if starts_workers:
        given_out = args.out is not None or args.resume is not None
        return launch.spawn(list(argv or []) + ([] if given_out else ["--out", out]),
                            settings.devices)

    writer = rank == 0
    results = {}
    try:
        for n, b in backends.items():
            results[n] = driver.train(
                b, settings, x, y, weights, progress=writer and not args.no_progress,
                resume=ckpts.get(n),
                checkpoint_path=(os.path.join(out, checkpoint.filename(n))
                                 if settings.checkpoint_every else None),
                checkpoint_extra={"init_source": weights_source},
                held_out=None if held_out is None else held_out[1:], writer=writer)
    except (UsageError, TrainingDiverged):
        raise
    except Exception as e:  # noqa: BLE001 - one of several processes: one line, exit 1
        if processes == 1:
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        raise ProcessFailed(f"{settings.framework} process {rank} of {processes} failed: "
                            f"{type(e).__name__}: {first}") from None
    if not writer:
        for b in backends.values():
            b.leave()
        return 0

    with outputs.staged(out) as stage:
        lines, written = [], {}
        for n, r in results.items():
            where = os.path.join(stage, n) if len(results) > 1 else stage
            beyond = (None if r.members is None else
                      extrapolation(backends[n], r, settings, dataset, x))
            written[n] = write_run(where, r, dataset, x, y, config, held_out, beyond)
            lines.append(summary(r, written[n]))
        if len(results) == 2:
            report = criteria.compare(results["jax"], results["torch"], y[:, 0],
                                      None if held_out is None else held_out[2][:, 0],
                                      (written["jax"], written["torch"]))
            outputs.write_json(os.path.join(stage, "parity.json"), report)
            figures.save(figures.parity_figure(results["jax"], results["torch"], x),
                         os.path.join(stage, "parity"))
            lines.append(
                f"parity: max |loss gap| {report['loss_history']['max_abs']:.3g}, "
                f"max |sigma gap| {report['sigma']['max_abs']:.3g}; metrics "
                + ("within" if report["metrics"]["pass"] else "NOT within")
                + " the reach of the predictions' gaps"
            )
        if not settings.checkpoint_every:  # checkpoints of a run this one replaces
            for fw in registry.PACKAGES:
                stale = os.path.join(out, checkpoint.filename(fw))
                if os.path.exists(stale):
                    os.remove(stale)
    print("\n".join(lines))
    print(f"wrote {out}")
    for b in backends.values():
        b.leave()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    return launch.finish(options.main(
        build_parser(), lambda args: run(args, argv), argv, interrupted="interrupted; nothing "
        "written to --out (checkpoints, if any, are kept)", report=launch.reporter()))


if __name__ == "__main__":  # how hetapps.launch starts a worker
    sys.exit(main())
