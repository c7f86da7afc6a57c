"""What the benchmark times: a variant is one loop of one framework with its engine options,
run through the train command's own driver (hetcore.driver.train), so that what is timed
is what a user runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from hetapps import registry
from hetcore import driver
from hetcore.backend import EngineOptions
from hetcore.errors import UsageError
from hetcore.interchange import architecture
from hetcore.settings import LOOPS, NO_REMAT, Settings

# Variants per device kind, in report order; the CUDA-only torch loops join on a GPU.
CPU_VARIANTS = ("jax:scan", "jax:step", "torch:eager", "torch:optim", "torch:compile",
                "torch:no-autograd")
CUDA_ONLY = ("torch:cudagraph", "torch:reduce-overhead")
GPU_VARIANTS = CPU_VARIANTS + CUDA_ONLY


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

        def once():
            return driver.train(fw.backend, settings, x, y, w, options=options)

        first = once()

        def repeat():
            r = once()
            return r.train_s, r.loss_history, r.final_loss

        repeat.first = (first.train_s, first.loss_history, first.final_loss)
        return first.compile_s, repeat

    return start


def variant(fw: Framework, loop: str, remat: bool = False,
            options: EngineOptions = EngineOptions()) -> Variant:
    """The variant named framework:loop, with +remat and +unroll<k> where they apply."""
    name = f"{fw.name}:{loop}" + ("+remat" if remat else "")
    if options.unroll != EngineOptions().unroll:
        name += f"+unroll{options.unroll}"
    return Variant(name, fw.name, loop, trial(fw, loop, remat, options), remat, options, fw)


def select(spec: str, fws: dict[str, Framework], remat: bool, unroll: list[int] | None,
           precision: str, extra: dict | None = None) -> list[Variant]:
    """The variants `spec` names ("all": every loop the device has) that can run here; JAX's
    scan once per `unroll` value; with `remat`, each loop that can also rematerialised.
    `extra` adds variants from outside by name (their trials as Variant.trial)."""
    kind = next(iter(fws.values())).kind if fws else "cpu"
    names = list(GPU_VARIANTS if kind == "gpu" else CPU_VARIANTS) if spec == "all" else \
        [s.strip() for s in spec.split(",") if s.strip()]
    out = []
    for name in names:
        framework, _, loop = name.partition(":")
        if framework not in LOOPS:
            raise UsageError(f"--variants {name}: expected framework:loop, e.g. jax:scan")
        if framework not in fws:
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
