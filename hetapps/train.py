"""The train command (SPEC section 3): parse, check everything, train, write atomically.

Frameworks are imported only when asked for, so `--framework jax` works without torch
installed and the other way round.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

import numpy as np

from hetcore import checkpoint, data, hostmem, interchange, outputs
from hetcore.errors import TrainingDiverged, UsageError
from hetcore.metrics import final_metrics
from hetcore.results import RunResult
from hetcore.settings import (DEVICES, DTYPES, FRAMEWORKS, LOOPS, PRESETS, Settings,
                              check_memory)

_PACKAGES = {"jax": "jaxhet", "torch": "torchhet"}
_MODULES = {n: f"{p}.train" for n, p in _PACKAGES.items()}


class Parser(argparse.ArgumentParser):
    """argparse with the one-line error of SPEC section 3 (no usage block before it)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="train.py",
        description="Train the lecture's heteroscedastic regression (mean and variance heads, "
        "Gaussian NLL, full-batch SGD) in JAX, PyTorch or both.",
    )
    d = Settings()
    p.add_argument("--framework", choices=FRAMEWORKS, default=d.framework)
    p.add_argument("--device", choices=DEVICES, default=d.device,
                   help="auto takes the best device present (default)")
    p.add_argument("--preset", choices=PRESETS, default=d.preset,
                   help="lecture: the lecture's exact data and initial weights where the other "
                   "options leave them as in the lecture; none: synthetic data and weights "
                   "drawn from --seed")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=None,
                   help="draw synthetic data and initial weights from this seed (replaces the "
                   "lecture's own draw)")
    p.add_argument("--n-points", type=int, default=d.n_points)
    p.add_argument("--width", type=int, default=d.width)
    p.add_argument("--depth", type=int, default=d.depth)
    p.add_argument("--dtype", choices=DTYPES, default=d.dtype)
    p.add_argument("--full", action="store_true",
                   help="add the constant 0.5*log(2*pi) to the loss")
    p.add_argument("--data", metavar="PATH", help=".npz with arrays x and y, or .csv with header x,y")
    p.add_argument("--init-from", metavar="PATH", help="initial weights (safetensors interchange file)")
    p.add_argument("--out", metavar="DIR", help="output directory (default: a new one under runs/)")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.add_argument("--chunk-epochs", type=int, default=d.chunk_epochs,
                   help="epochs per compiled chunk (one host sync and progress update each)")
    p.add_argument("--loop", default=d.loop, metavar="NAME",
                   help=f"training loop: jax {'|'.join(LOOPS['jax'])}, torch "
                   f"{'|'.join(LOOPS['torch'])}; auto (default) takes the device's fastest")
    p.add_argument("--remat", action="store_true",
                   help="rematerialise the trunk in the backward pass (jax.checkpoint, "
                   "torch.utils.checkpoint): less activation memory, one more forward")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, metavar="K",
                   help="write DIR/checkpoint-<framework>.safetensors every K epochs (0: never)")
    p.add_argument("--resume", metavar="DIR",
                   help="continue the run in DIR from its checkpoints, with its own settings")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def settings_from_args(args: argparse.Namespace) -> Settings:
    return Settings(
        framework=args.framework, device=args.device, preset=args.preset, epochs=args.epochs,
        lr=args.lr, seed=args.seed, n_points=args.n_points, width=args.width, depth=args.depth,
        dtype=args.dtype, full=args.full, data=args.data, init_from=args.init_from,
        chunk_epochs=args.chunk_epochs, loop=args.loop, checkpoint_every=args.checkpoint_every,
        remat=args.remat,
    )


def load_framework(name: str):
    try:
        return importlib.import_module(_MODULES[name])
    except ImportError as e:
        raise UsageError(f"--framework {name}: cannot import it ({e})") from None


def initial_weights(settings: Settings, init_module) -> tuple[dict, str]:
    """The run's initial weights and where they came from."""
    if settings.init_from is not None:
        w = interchange.read_weights(settings.init_from, settings.width, settings.depth,
                                     settings.dtype)
        return w, os.path.abspath(settings.init_from)
    if settings.lecture_weights:
        return interchange.cast(interchange.lecture_weights(), settings.dtype), "lecture"
    w = init_module.init_weights(settings.width, settings.depth, settings.dtype,
                                 settings.init_seed)
    return w, f"{init_module.FRAMEWORK} init(seed={settings.init_seed})"


class _Progress:
    """A tqdm bar over epochs, updated once per chunk."""

    def __init__(self, label: str, total: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=label, unit="epoch", file=sys.stderr,
                            dynamic_ncols=True, disable=None)

    def __call__(self, done: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.5f}")

    def close(self):
        if self.bar is not None:
            self.bar.close()


def write_run(stage_dir: str, result: RunResult, dataset: data.Dataset, x: np.ndarray,
              y: np.ndarray, config: dict) -> dict:
    """All files of one framework's run into `stage_dir`; returns the metrics."""
    from hetcore import figures

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
                               dataset.true_sigma()),
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


# Options that shape a run; with --resume they come from the checkpoint.
_RUN_OPTIONS = ("framework", "preset", "epochs", "lr", "seed", "n_points", "width", "depth",
                "dtype", "full", "data", "init_from", "chunk_epochs", "loop", "checkpoint_every",
                "remat")


def resume_plan(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """(settings, out, checkpoints by framework) for `--resume DIR`."""
    out = args.resume
    if args.out is not None and os.path.abspath(args.out) != os.path.abspath(out):
        raise UsageError(f"--resume {out}: the run continues in its own directory; drop --out")
    if not os.path.isdir(out):
        raise UsageError(f"--resume {out}: no such directory")
    found = {fw: os.path.join(out, checkpoint.filename(fw)) for fw in ("jax", "torch")}
    found = {fw: p for fw, p in found.items() if os.path.isfile(p)}
    if not found:
        raise UsageError(f"--resume {out}: holds no checkpoint (checkpoint-*.safetensors); "
                         "was the run started with --checkpoint-every?")
    ckpts = {fw: checkpoint.load(p) for fw, p in found.items()}
    first = next(iter(ckpts.values()))
    for fw, c in ckpts.items():
        if c.settings != first.settings or c.framework != fw:
            raise UsageError(f"--resume {out}: {checkpoint.filename(fw)} belongs to another run")
    settings = Settings(**{**first.settings, "device": first.settings["device"]
                           if args.device == parser.get_default("device") else args.device})
    for name in _RUN_OPTIONS:
        given, default = getattr(args, name), parser.get_default(name)
        if given != default and given != getattr(settings, name):
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"--resume {out}: {flag} {given} differs from the checkpoint's "
                             f"{getattr(settings, name)}; the run keeps its own settings")
    if any(os.path.exists(os.path.join(out, n)) for n in ("metrics.json", "parity.json")):
        raise UsageError(f"--resume {out}: the run there has finished already")
    return settings, out, ckpts


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    ckpts: dict = {}
    if args.resume is not None:
        settings, out, ckpts = resume_plan(args, parser)
    else:
        settings = settings_from_args(args)
        out = args.out or outputs.default_out(settings.framework)
        outputs.check_out(out, args.overwrite)
    names = ["jax", "torch"] if settings.framework == "both" else [settings.framework]
    host_malloc = hostmem.keep_freed_memory()  # before a framework allocates anything
    modules = {n: load_framework(n) for n in names}
    devices = {n: m.resolve_device(settings.device) for n, m in modules.items()}

    def check_fits(n_points: int) -> None:
        for n, m in modules.items():
            dev_module = importlib.import_module(f"{_PACKAGES[n]}.device")
            check_memory(settings, n_points, dev_module.memory_bytes(devices[n]),
                         dev_module.describe(devices[n]))

    if settings.data is None:
        check_fits(settings.n_points)  # before drawing the points
    dataset = data.for_settings(settings)
    x, y = dataset.columns(settings.dtype)
    check_fits(x.shape[0])
    digest = checkpoint.data_digest(x, y)
    for fw, c in ckpts.items():
        if c.data_digest != digest:
            raise UsageError(f"--resume {out}: the data differ from those the run started with "
                             f"({dataset.source})")
    if ckpts:
        c = next(iter(ckpts.values()))
        weights, weights_source = c.initial_weights, c.extra.get("init_source", "checkpoint")
    else:
        weights, weights_source = initial_weights(settings, modules[names[0]])
    config = {**settings.to_dict(), "data_source": dataset.source, "data_sha256": digest,
              "init_source": weights_source, "n_points_used": int(x.shape[0]),
              "host_malloc": host_malloc, "out": os.path.abspath(out),
              "resumed_from_epoch": {fw: c.epoch for fw, c in ckpts.items()}}

    def saver(fw: str):
        if not settings.checkpoint_every:
            return None
        path = os.path.join(out, checkpoint.filename(fw))

        def save(epoch, weights_now, optimizer, history):
            os.makedirs(out, exist_ok=True)
            checkpoint.save(path, checkpoint.Checkpoint(
                framework=fw, epoch=epoch, weights=weights_now, optimizer=optimizer,
                loss_history=history, initial_weights=weights, settings=settings.to_dict(),
                data_digest=digest, extra={"init_source": weights_source}))

        return save

    results = {}
    for n, m in modules.items():
        bar = _Progress(f"{n} train", settings.epochs, not args.no_progress)
        try:
            results[n] = m.train(settings, x, y, weights, progress=bar, resume=ckpts.get(n),
                                 on_checkpoint=saver(n))
        finally:
            bar.close()

    with outputs.staged(out) as stage:
        lines = []
        for n, r in results.items():
            where = os.path.join(stage, n) if len(results) > 1 else stage
            metrics = write_run(where, r, dataset, x, y, config)
            lines.append(summary(r, metrics))
        if len(results) == 2:
            from hetcore import figures, parity

            report = parity.compare(results["jax"], results["torch"])
            outputs.write_json(os.path.join(stage, "parity.json"), report)
            figures.save(figures.parity_figure(results["jax"], results["torch"], x),
                         os.path.join(stage, "parity"))
            lines.append(
                f"parity: max |loss gap| {report['loss_history']['max_abs']:.3g}, "
                f"max |sigma gap| {report['sigma']['max_abs']:.3g}"
            )
        if not settings.checkpoint_every:  # checkpoints of a run this one replaces
            for fw in ("jax", "torch"):
                stale = os.path.join(out, checkpoint.filename(fw))
                if os.path.exists(stale):
                    os.remove(stale)
    print("\n".join(lines))
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 with "train.py: error: ..." on bad usage
    try:
        return run(args, parser)
    except (UsageError, TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted; nothing written to --out (checkpoints, if any, are kept)",
              file=sys.stderr)
        return 130
