"""The loss comparison (`python scripts/compare_losses.py`, `jaxhet-compare`): MSE, NLL and
beta-NLL fitted to the same data from the same initial weights, drawn side by side with
each fit's metrics. By default the lecture's contradictory data (`--preset two-sines`),
where the point of the lecture shows: MSE finds the mean between the two curves and says
nothing of the spread, the NLL finds both.

Writes DIR/<loss>/ (each fit's run files, as the train command writes them),
DIR/compare.json (each fit's final metrics) and DIR/losses.png, .svg.
"""

from __future__ import annotations

import argparse
import os

from hetapps import options, registry
from hetapps.train import summary, write_run
from hetcore import checkpoint, data, driver, figures, hostmem, outputs
from hetcore.errors import UsageError
from hetcore.settings import check_memory

LOSSES = ("mse", "nll", "beta-nll")  # the order of the panels


def build_parser() -> argparse.ArgumentParser:
    p = options.Parser(
        prog="compare_losses.py",
        description="Fit MSE, NLL and beta-NLL to the same data from the same initial weights "
        "and draw the three fits side by side. Defaults: --preset two-sines --recipe "
        "calibrated.")
    options.add_settings(p, exclude=("loss", "checkpoint_every"))
    p.set_defaults(preset="two-sines", recipe="calibrated")
    p.add_argument("--out", metavar="DIR", help="output directory (default: a new one under runs/)")
    p.add_argument("--overwrite", action="store_true", help="replace a comparison already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> int:
    base = options.settings(args)
    if base.framework == "both":
        raise UsageError("--framework both: the comparison fits in one framework; choose jax "
                         "or torch (train.py --framework both compares the frameworks)")
    out = outputs.default_out("compare") if args.out is None else args.out
    outputs.check_out(out, args.overwrite, (base.data, base.test_data, base.init_from))
    host_malloc = hostmem.keep_freed_memory()
    backend = registry.backend(base.framework)
    device = backend.resolve_device(base.device)
    fits = {loss: base.replace(loss=loss) for loss in LOSSES}  # each loss's own options
    dataset = data.for_settings(base)
    x, y = dataset.columns(base.dtype)
    check_memory(base, x.shape[0], backend.memory_bytes(device), backend.describe(device))
    for s in fits.values():
        s.check_run(x.shape[0])
    weights, source = driver.initial_weights(base, backend)
    results = {loss: driver.train(backend, s, x, y, weights, progress=not args.no_progress)
               for loss, s in fits.items()}
    with outputs.staged(out) as stage:
        report, lines = {}, []
        for loss, r in results.items():
            config = {**fits[loss].to_dict(), "data_source": dataset.source,
                      "data_sha256": checkpoint.data_digest(x, y), "init_source": source,
                      "n_points_used": int(x.shape[0]), "host_malloc": host_malloc,
                      "out": os.path.abspath(out)}
            metrics = write_run(os.path.join(stage, loss), r, dataset, x, y, config)
            report[loss] = {"config": fits[loss].to_dict(), "final": metrics["final"]}
            lines.append(f"{loss}: " + summary(r, metrics))
        outputs.write_json(os.path.join(stage, "compare.json"),
                           {"data_source": dataset.source, "init_source": source,
                            "fits": report})
        fig = figures.loss_comparison_figure(
            x[:, 0], y[:, 0], {loss: (r.mu, r.sigma, report[loss]["final"])
                               for loss, r in results.items()},
            dataset.true_mean(), dataset.true_sigma(),
            f"{base.framework}, {dataset.source}, {base.epochs} epochs")
        figures.save(fig, os.path.join(stage, "losses"))
    print("\n".join(lines))
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return options.main(build_parser(), run, argv, interrupted="interrupted; nothing "
                        "written to --out")
