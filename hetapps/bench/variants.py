"""What the benchmark times: a variant is one loop of one framework with its engine options,
run through the train command's own driver (hetcore.driver.train), so that what is timed
is what a user runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from hetapps import registry
from hetcore import driver, interchange
from hetcore.backend import EngineOptions
from hetcore.errors import UsageError
from hetcore.interchange import architecture
from hetcore.settings import LOOPS, NO_REMAT, Settings

# Variants per device kind, in report order; the CUDA-only torch loops join on a GPU.
CPU_VARIANTS = ("jax:scan", "jax:step", "torch:eager", "torch:optim", "torch:compile",
                "torch:no-autograd", "torch:compile-update")
CUDA_ONLY = ("torch:cudagraph", "torch:reduce-overhead")
GPU_VARIANTS = CPU_VARIANTS + CUDA_ONLY
# With --ensemble K: each framework's ensemble program (JAX's also with each way of running
# its members, EngineOptions.members) against K single runs.
# torch's "ensemble-compile": its program with the members' updates compiled whole
# (--loop compile-update).
ENSEMBLE_LOOPS = ("ensemble", "ensemble-vmap", "ensemble-map", "ensemble-compile", "singles")
ENSEMBLE_VARIANTS = ("jax:ensemble", "jax:ensemble-vmap", "jax:ensemble-map", "jax:singles",
                     "torch:ensemble", "torch:ensemble-compile", "torch:singles")


@dataclass
class Framework:
    """One framework as the benchmark uses it: its backend and measurements, and the
    device it runs on."""

    name: str
    backend: object
    measure: object
    device: str  # the --device name
    kind: str  # cpu, gpu or tpu
    describe: str

    @classmethod
    def load(cls, name: str, device: str) -> "Framework":
        backend = registry.backend(name, label=name)
        dev = backend.resolve_device(device)
        return cls(name, backend, registry.measure(name, label=name), device,
                   backend.platform(dev), backend.describe(dev))


def run_settings(fw: "Framework", loop: str, base: Settings, weights, x,
                 remat: bool = False) -> Settings:
    """The Settings of a benchmark run: `base`'s training options (epochs, chunk length,
    learning rate, loss, optimiser, batches...), the workload's data and weights, `loop`."""
    width, depth = architecture(weights)
    return base.replace(framework=fw.name, device=fw.device, preset="none", seed=None,
                        data=None, init_from=None, n_points=len(x), width=width, depth=depth,
                        dtype=str(x.dtype), loop=loop, remat=remat, checkpoint_every=0)


@dataclass
class Variant:
    """One loop of one framework. `trial(weights, x, y, settings)` compiles or warms up
    and trains once as `settings` say (a template: hetapps.bench.variants.run_settings), then returns (compile seconds, repeat); repeat() trains
    the whole run again from the initial weights and returns (its training seconds, loss
    history, loss of the final weights); `repeat.first` holds the first run's."""

    name: str
    framework: str  # jax, torch, or another name for a variant from outside
    loop: str
    trial: Callable
    remat: bool = False
    options: EngineOptions = field(default_factory=EngineOptions)
    fw: Framework | None = None  # None for a variant from outside (no memory measured)


def trial(fw: Framework, loop: str, remat: bool = False,
          options: EngineOptions = EngineOptions()) -> Callable:
    """A variant's trial (see Variant): the driver's run, from the same data and initial
    weights every time."""

    def start(w, x, y, base: Settings):
        settings = run_settings(fw, loop, base, w, x, remat)
        return _timed(lambda: driver.train(fw.backend, settings, x, y, w, options=options))

    return start


def _timed(once: Callable):
    """(compile seconds, repeat) of a trial whose run is once() -> a RunResult (or one's
    train_s, compile_s, loss_history, final_loss)."""
    first = once()

    def repeat():
        r = once()
        return r.train_s, r.loss_history, r.final_loss

    repeat.first = (first.train_s, first.loss_history, first.final_loss)
    return first.compile_s, repeat


@dataclass
class _Members:
    """K single runs as one: their seconds summed, their losses averaged (as an ensemble's
    loss history is its members' mean)."""

    train_s: float
    compile_s: float
    loss_history: object
    final_loss: float


def ensemble_trial(fw: Framework, loop: str) -> Callable:
    """An ensemble's trial: its members in the framework's one program (the engine of
    --ensemble; "ensemble-vmap", "ensemble-map": JAX's with EngineOptions.members so), or
    ("singles"), the obvious alternative, K single runs one after another, member k from
    its own weights and shuffle seed S + k, each on the framework's default loop."""
    singles, compiled = loop == "singles", loop == "ensemble-compile"
    options = None if singles else EngineOptions(
        members="auto" if compiled else loop.partition("-")[2] or "auto")

    def start(w, x, y, base: Settings):
        members = interchange.unstack(w)
        settings = run_settings(fw, "compile-update" if compiled else "auto", base,
                                members[0], x)
        if not singles:
            return _timed(lambda: driver.train(fw.backend, settings, x, y, w, options=options))
        each = [settings.replace(ensemble=1, shuffle_seed=settings.shuffle_seed + k)
                for k in range(len(members))]

        def once():
            runs = [driver.train(fw.backend, s, x, y, m) for s, m in zip(each, members)]
            return _Members(sum(r.train_s for r in runs), sum(r.compile_s for r in runs),
                            np.mean([r.loss_history for r in runs], axis=0),
                            float(np.mean([r.final_loss for r in runs])))

        return _timed(once)

    return start


def variant(fw: Framework, loop: str, remat: bool = False,
            options: EngineOptions = EngineOptions()) -> Variant:
    """The variant named framework:loop, with +remat and +unroll<k> where they apply."""
    name = f"{fw.name}:{loop}" + ("+remat" if remat else "")
    if options.unroll != EngineOptions().unroll:
        name += f"+unroll{options.unroll}"
    return Variant(name, fw.name, loop, trial(fw, loop, remat, options), remat, options, fw)


def select(spec: str, fws: dict[str, Framework], remat: bool, unroll: list[int] | None,
           precision: str, extra: dict | None = None, ensemble: int = 1) -> list[Variant]:
    """The variants `spec` names ("all": every loop the device has) that can run here; JAX's
    scan once per `unroll` value; with `remat`, each loop that can also rematerialised.
    `extra` adds variants from outside by name (their trials as Variant.trial). An
    ensemble (ensemble > 1) has its own: ENSEMBLE_VARIANTS."""
    kind = next(iter(fws.values())).kind if fws else "cpu"
    every = ENSEMBLE_VARIANTS if ensemble > 1 else GPU_VARIANTS if kind == "gpu" else \
        CPU_VARIANTS
    names = list(every) if spec == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    out = []
    for name in names:
        framework, _, loop = name.partition(":")
        if framework not in LOOPS:
            raise UsageError(f"--variants {name}: expected framework:loop, e.g. jax:scan")
        if framework not in fws:
            continue
        if (loop in ENSEMBLE_LOOPS) != (ensemble > 1):
            raise UsageError(f"--variants {name}: " + (
                f"an ensemble's variants are {', '.join(ENSEMBLE_VARIANTS)}" if ensemble > 1
                else f"{framework}:{loop} times an ensemble; give --ensemble K"))
        if loop in ENSEMBLE_LOOPS:
            if remat:
                raise UsageError("--remat: an ensemble's variants do not rematerialise")
            if (framework == "torch") != (loop == "ensemble-compile") and \
                    loop.startswith("ensemble-"):
                raise UsageError(f"--variants {name}: {framework}'s ensemble variants are "
                                 + ", ".join(v for v in ENSEMBLE_VARIANTS
                                             if v.startswith(framework + ":")))
            out.append(Variant(name, framework, loop, ensemble_trial(fws[framework], loop)))
            continue
        if loop not in LOOPS[framework]:
            raise UsageError(f"--variants {name}: {framework} has {', '.join(LOOPS[framework])}")
        if name in CUDA_ONLY and kind != "gpu":
            raise UsageError(f"--variants {name}: needs a CUDA device; {framework} is on {kind}")
        fw = fws[framework]
        unrolls = dict.fromkeys(unroll or [EngineOptions().unroll]) if name == "jax:scan" \
            else [EngineOptions().unroll]
        for k in unrolls:
            out.append(variant(fw, loop, False, EngineOptions(k, precision)))
        if remat and loop not in NO_REMAT:
            out.append(variant(fw, loop, True, EngineOptions(matmul_precision=precision)))
    for name, start in (extra or {}).items():
        out.append(Variant(name, "extra", name, start))
    if not out:
        raise UsageError(f"--variants {spec}: none of them can run here")
    return out
