"""One mapping from Settings to command-line options, used by every command, and one error
format: a single line `error: ...` on stderr, exit status 2.

Every Settings field is an option named after it (`n_points` is `--n-points`). Options
default to None on the command line, so that what was given is read from the command line
itself (`given`), and what was not comes from Settings' own defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Callable

from hetcore.errors import ProcessFailed, TrainingDiverged, UsageError
from hetcore.settings import (DEVICES, DTYPES, FRAMEWORKS, LOOPS, LOSSES, OPTIMIZERS, PRESETS,
                              RECIPES, SCHEDULES, Settings)

_LOOP_HELP = (f"training loop: jax {'|'.join(LOOPS['jax'])}, torch {'|'.join(LOOPS['torch'])}; "
              "auto takes the device's fastest")

# Settings field -> how the command line gives it (argparse keywords; flag: a switch).
SETTINGS_OPTIONS: dict[str, dict] = {
    "framework": dict(choices=FRAMEWORKS, help="which framework trains"),
    "device": dict(choices=DEVICES, help="auto takes the best device present"),
    "preset": dict(choices=PRESETS, help="lecture: the lecture's exact data and initial "
                   "weights where the other options leave them as in the lecture; none: "
                   "synthetic data and weights drawn from --seed; two-sines: the lecture's "
                   "contradictory data, each point on one of two sine curves"),
    "epochs": dict(type=int, shown="the recipe's; lecture 500", help="training epochs"),
    "lr": dict(type=float, shown="the recipe's; lecture 0.001",
               help="learning rate (the peak, with a schedule)"),
    "seed": dict(type=int, shown="the preset's", help="draw synthetic data and initial "
                 "weights from this seed (replaces the lecture's own draw)"),
    "n_points": dict(type=int, help="synthetic data size"),
    "width": dict(type=int, help="trunk width"),
    "depth": dict(type=int, help="trunk depth (Linear + ReLU blocks)"),
    "dtype": dict(choices=DTYPES, help="precision of every computation"),
    "full": dict(flag=True, help="add the constant 0.5*log(2*pi) to the loss"),
    "data": dict(metavar="PATH", help=".npz with arrays x and y, or .csv with header x,y"),
    "test_data": dict(metavar="PATH", shown="for synthetic data, a fresh draw of their law",
                      help="held-out data to evaluate on, in the --data formats"),
    "init_from": dict(metavar="PATH", help="initial weights (safetensors interchange file)"),
    "chunk_epochs": dict(type=int, metavar="N", help="epochs per compiled chunk (one host "
                         "sync and progress update each)"),
    "loop": dict(metavar="NAME", help=_LOOP_HELP),
    "checkpoint_every": dict(type=int, metavar="K", help="write DIR/checkpoint-<framework>"
                             ".safetensors every K epochs (0: never)"),
    "remat": dict(flag=True, help="rematerialise the trunk in the backward pass "
                  "(jax.checkpoint, torch.utils.checkpoint): less activation memory, one "
                  "more forward"),
    "recipe": dict(choices=tuple(RECIPES), help="named defaults for the training options "
                   "below and --epochs, --lr; options given override them (calibrated: the "
                   "recommended recipe for recovering sigma(x))"),
    "loss": dict(choices=LOSSES, shown="the recipe's; lecture nll", help="nll (the "
                 "lecture's), beta-nll (each point's NLL weighted by var**beta, the weight "
                 "not differentiated), mse (the mean alone; sigma from the residuals)"),
    "beta": dict(type=float, shown="0.5 with beta-nll", help="beta-NLL's exponent, in [0, 1] "
                 "(0 is the NLL)"),
    "optimizer": dict(choices=OPTIMIZERS, shown="the recipe's; lecture sgd",
                      help="sgd, adam or adamw (betas 0.9, 0.999, eps 1e-8)"),
    "momentum": dict(type=float, shown="0 with sgd", help="sgd's momentum, in [0, 1) "
                     "(PyTorch's law: dampening 0)"),
    "nesterov": dict(flag=True, help="sgd's Nesterov momentum (needs --momentum)"),
    "weight_decay": dict(type=float, shown="1e-4 with adamw", help="adamw's decoupled weight "
                         "decay of every parameter, in [0, 10]"),
    "schedule": dict(choices=SCHEDULES, shown="the recipe's; lecture constant",
                     help="the learning rate per update after the warm-up: constant, or "
                     "cosine decay to --lr-end over the rest of the run"),
    "warmup_steps": dict(type=int, metavar="W", shown="0", help="updates of linear warm-up "
                         "from 0 to --lr"),
    "lr_end": dict(type=float, shown="0 with cosine", help="the learning rate the cosine "
                   "schedule ends at"),
    "batch_size": dict(type=int, metavar="B", shown="every point", help="points per batch "
                       "(one update each; the last batch of an epoch shorter)"),
    "ensemble": dict(type=int, metavar="K", help="train K members together in one program "
                     "(member k: initial weights from seed + k, shuffle seed S + k); the "
                     "run's predictions are their Gaussian mixture"),
    "devices": dict(type=int, metavar="N", help="data-parallel training over N devices: "
                    "jax on N of the platform's devices (on a CPU, XLA_FLAGS="
                    "--xla_force_host_platform_device_count=N makes them), torch in N "
                    "processes (DistributedDataParallel; or as many as torchrun started)"),
    "shuffle_seed": dict(type=int, metavar="S", help="epoch e visits the points in the order "
                         "np.random.default_rng([S, e]).permutation(N)"),
}
assert set(SETTINGS_OPTIONS) == {f.name for f in dataclasses.fields(Settings)}, \
    "every Settings field needs its option"


def flag(name: str) -> str:
    """The option of Settings field `name`: n_points -> --n-points."""
    return "--" + name.replace("_", "-")


class Parser(argparse.ArgumentParser):
    """argparse whose refusals are one line, `error: ...`, exit status 2, as every other
    bad input of the commands (no usage block before it)."""

    def __init__(self, *args, **kwargs):
        # an abbreviation would be taken for another option (--data for --data-parallel)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def add_settings(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """Add an option for every Settings field but those in `exclude`."""
    defaults = Settings()
    for name, spec in SETTINGS_OPTIONS.items():
        if name in exclude:
            continue
        spec = dict(spec)
        default = getattr(defaults, name)
        shown = spec.pop("shown", "off" if spec.get("flag") else
                         ("none" if default is None else default))
        spec["help"] = f"{spec['help']} (default: {shown})"
        if spec.pop("flag", False):
            parser.add_argument(flag(name), action="store_true", default=None, **spec)
        else:
            parser.add_argument(flag(name), default=None, **spec)


def given(args: argparse.Namespace) -> dict:
    """The Settings fields the command line gave, by name, with their values."""
    return {name: getattr(args, name) for name in SETTINGS_OPTIONS
            if getattr(args, name, None) is not None}


def settings(args: argparse.Namespace, **fixed) -> Settings:
    """Settings from the options given, Settings' defaults for the rest; `fixed` fields are
    the command's own (checked like any other)."""
    return Settings(**{**given(args), **fixed})


def main(parser: argparse.ArgumentParser, run: Callable, argv: list[str] | None = None,
         interrupted: str | None = None, report: Callable | None = None) -> int:
    """A command's entry point: parse (bad usage exits 2 with one line), run, and turn the
    failures a command reports without a traceback into their line and exit status
    (UsageError 2, TrainingDiverged and ProcessFailed 1). With `interrupted`, an interrupt
    prints that line and exits 130; without, it goes on up (a command that keeps what it
    measured so far). `report(code, line)`, if given, takes the failure's line instead of
    stderr (a worker of hetapps.launch)."""
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (UsageError, TrainingDiverged, ProcessFailed) as e:
        if report is not None:
            report(e.exit_code, f"error: {e}")
        else:
            print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        if interrupted is None:
            raise
        print(f"error: {interrupted}", file=sys.stderr)
        return 130
