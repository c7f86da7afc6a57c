"""The benchmark (scripts/bench.py): every training loop of both frameworks on the same
data, initial weights, precision and thread count, set against references measured in the
same run (SPEC section 6).

- Each variant is compiled or warmed up once (timed apart), then trains the whole run from
  the initial weights `--repeats` times through the train command's own driver
  (jaxhet.train.train, torchhet.train.train; `via_train`); repeats go round-robin over the
  variants so that a noisy neighbour on the machine hurts them alike. Reported: median,
  min and max seconds per epoch.
- FLOPs per epoch: XLA's cost analysis of jaxhet's compiled epoch, used for every variant.
- References: the float32 matrix-multiply peak of each library (a large square product;
  the faster library is the device's peak) and the matmul floor of each (one epoch's own
  products back to back), best of the repeats.
- Agreement: the float32 runs must agree over their first epochs (before the lecture's
  SGD turns chaotic and float32 rounding makes any two kernels part), and, run again in
  float64 from the same weights, the final losses of all variants must agree. A variant
  that fails either makes the benchmark fail (exit status 1).
- `--sweep`: points x widths, time per epoch and memory against FLOPs per epoch, with and
  without rematerialisation, and the largest point count that fits a memory budget.

Frameworks are imported inside functions only (hetcore imports neither at module level).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from hetcore import hostmem
from hetcore.errors import UsageError

GIB = 1024 ** 3
CHECK_ATOL = 1e-4  # float32 loss agreement over the first epochs (rounding there: ~1e-7)
CHECK_EPOCHS = 100
F64_RTOL = 1e-6  # float64 final losses (frameworks agree to ~3e-7 over the lecture run)
DRIFT_WARN = 0.10  # peak before and after the variants further apart: flagged in the table
SETTLE_S = 0.5  # pause when switching frameworks, so that the other's threads go idle

# Variants per device kind, in report order; the CUDA-only torch loops join on CUDA.
CPU_VARIANTS = ("jax:scan", "jax:step", "torch:eager", "torch:optim", "torch:compile",
                "torch:no-autograd")
CUDA_VARIANTS = CPU_VARIANTS + ("torch:cudagraph", "torch:reduce-overhead")


@dataclass
class Variant:
    """One loop of one framework. `trial(weights, x, y, lr, full, epochs, chunk, remat)`
    returns (compile seconds, run) with run() -> (seconds, loss history, final loss)."""

    name: str
    framework: str
    loop: str
    trial: Callable
    remat: bool = False
    memory: Callable | None = None  # (weights, x, y, lr, full, chunk) -> dict of bytes
    extra: dict = field(default_factory=dict)


# ---- the two frameworks, behind one small interface -----------------------------------

@contextlib.contextmanager
def _setting(module, name: str, value):
    """`module.name = value` for the duration (a variant's own knob, e.g. JAX's unroll)."""
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def via_train(framework: str, loop: str, device: str, remat: bool = False,
              around: Callable | None = None) -> Callable:
    """A variant's trial that runs the train command's own driver (jaxhet.train.train or
    torchhet.train.train: chunks, host syncs, divergence checks, all of it) on the same
    data and initial weights every time. trial(...) compiles or warms up and trains once
    (not timed as a repeat, but kept as `run.first`), then returns (compile or warm-up
    seconds, run); run() trains the whole run again from the initial weights and returns
    (its training seconds, loss history, loss of the final weights). `around()`, a context
    manager, wraps every call (a variant's own knob, e.g. JAX's unroll or torch's TF32)."""
    import importlib

    from hetcore.interchange import architecture
    from hetcore.settings import Settings

    def trial(w, x, y, lr, full, epochs, chunk, remat=remat):
        train = importlib.import_module(f"{framework}het.train").train
        width, depth = architecture(w)
        settings = Settings(framework=framework, device=device, preset="none", epochs=epochs,
                            lr=lr, n_points=len(x), width=width, depth=depth,
                            dtype=str(x.dtype), full=full, chunk_epochs=chunk, loop=loop,
                            remat=remat)

        def once():
            with around() if around else contextlib.nullcontext():
                return train(settings, x, y, w)

        first = once()

        def run():
            r = once()
            return r.train_s, r.loss_history, r.final_loss

        run.first = (first.train_s, first.loss_history, first.final_loss)  # the warm-up run
        return first.compile_s, run

    return trial


class _Jax:
    name = "jax"

    def __init__(self, device: str):
        import jax

        from jaxhet import loops
        from jaxhet.device import describe, resolve_device

        self.jax, self.loops = jax, loops
        self.device_arg = device
        self.device = resolve_device(device)
        self.kind = self.device.platform
        self.describe = describe(self.device)

    def version(self) -> str:
        return self.jax.__version__

    def variant(self, loop: str, remat: bool = False, unroll: int | None = None) -> Variant:
        """`unroll` (scan only; None: jaxhet's own) is named in the variant's name where it
        is not jaxhet's own."""
        around = None if unroll is None else (lambda: _setting(self.loops, "UNROLL", unroll))
        trial = via_train("jax", loop, self.device_arg, remat, around)

        def memory(w, x, y, lr, full, chunk, epochs):
            with around() if around else contextlib.nullcontext():
                return self._memory(loop, w, x, y, lr, full, chunk, epochs, remat)

        tag = f"jax:{loop}" + ("+remat" if remat else "")
        if unroll not in (None, self.loops.UNROLL):
            tag += f"+unroll{unroll}"
        return Variant(tag, "jax", loop, trial, remat, memory)

    def _setup(self, w, x, y, lr):
        import jax.numpy as jnp
        import optax

        from hetcore.interchange import architecture
        from jaxhet.train import _put, enable_dtype

        dtype = str(x.dtype)
        enable_dtype(dtype)
        width, depth = architecture(w)
        graphdef, params = _put(w, width, depth, dtype, self.device)
        carry = self.loops.new_carry(params, optax.sgd(lr).init(params), self.device)
        xs, ys = self.jax.device_put(x, self.device), self.jax.device_put(y, self.device)
        lr_ = self.jax.device_put(jnp.asarray(lr, dtype=dtype), self.device)
        return graphdef, params, carry, xs, ys, lr_

    def _memory(self, loop, w, x, y, lr, full, chunk, epochs, remat):
        from hetcore.results import chunk_plan

        graphdef, params, carry, xs, ys, lr_ = self._setup(w, x, y, lr)
        length, _ = chunk_plan(epochs, chunk)
        plan = self.loops.memory_plan(loop, graphdef, full, length, carry, xs, ys, lr_,
                                      self.device, remat)
        act = self.loops.activation_bytes(graphdef, full, params, xs, ys, remat)
        return {"peak_bytes": plan.get("peak"), "peak_memory_method":
                "XLA buffer plan of the compiled program (arguments + outputs + temporaries "
                "- donated)", "activation_bytes": act, "xla_plan": plan}

    def flops(self, w, x, y, lr, full) -> float:
        graphdef, params, carry, xs, ys, lr_ = self._setup(w, x, y, lr)
        return self.loops.epoch_flops(graphdef, full, carry, xs, ys, lr_)

    def matmul(self, size, dtype, repeats):
        return self.loops.matmul_seconds(size, dtype, self.device, repeats)

    def floor(self, n, width, depth, dtype, repeats):
        return self.loops.floor_seconds(n, width, depth, dtype, self.device, repeats)


class _Torch:
    name = "torch"

    def __init__(self, device: str, threads: int | None, tf32: bool = False):
        import torch

        from torchhet import loops
        from torchhet.device import describe, resolve_device

        self.torch, self.loops = torch, loops
        self.device_arg = device
        self.device = resolve_device(device)
        self.kind = "gpu" if self.device.type == "cuda" else "cpu"
        self.describe = describe(self.device)
        if threads:
            torch.set_num_threads(threads)
        self.tf32 = tf32

    def version(self) -> str:
        return self.torch.__version__

    def _knob(self) -> Callable | None:
        """The labelled TF32 option: torchhet.train's matmul precision for these runs only;
        torch's own global setting is put back after each (the peaks stay float32)."""
        if not self.tf32:
            return None
        import torchhet.train

        @contextlib.contextmanager
        def tf32():
            before = self.torch.get_float32_matmul_precision()
            try:
                with _setting(torchhet.train, "MATMUL_PRECISION", "high"):
                    yield
            finally:
                self.torch.set_float32_matmul_precision(before)

        return tf32

    def variant(self, loop: str, remat: bool = False) -> Variant:
        trial = via_train("torch", loop, self.device_arg, remat, self._knob())

        def memory(w, x, y, lr, full, chunk, epochs):
            return self._memory(loop, w, x, y, lr, full, chunk, epochs, remat)

        tag = f"torch:{loop}" + ("+remat" if remat else "")
        return Variant(tag, "torch", loop, trial, remat, memory)

    def _memory(self, loop, w, x, y, lr, full, chunk, epochs, remat):
        from torchhet.train import _build, _tensor

        torch, dev = self.torch, self.device
        model = _build(w, str(x.dtype), dev)
        xs, ys = _tensor(x, dev), _tensor(y, dev)
        act = self.loops.activation_bytes(model, xs, ys, full, remat, loop)
        out = {"activation_bytes": act}
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        n, width = x.shape[0], model.layers[0].out_features
        del model, xs, ys
        gc.collect()

        def run():
            via_train("torch", loop, self.device_arg, remat, self._knob())(
                w, x, y, lr, full, min(epochs, 3), chunk)

        if dev.type == "cuda":
            torch.cuda.empty_cache()
            self.loops.reset_peak(dev)
            run()
            out["peak_bytes"] = self.loops.peak_bytes(dev)
            out["peak_memory_method"] = "CUDA caching allocator peak over a 3-epoch run"
            return out
        item = x.dtype.itemsize
        held = 2 * params + 2 * n * item + act  # what an epoch cannot do without
        self._warm_host()
        runs = []
        for _ in range(2):  # the same run peaks one (N, width) block apart at times
            with hostmem.ResidentPeak() as measured:
                run()
            runs.append(measured.bytes)
        if None not in runs:
            # Pages, not tensors: a tiny run fits in pages the process already has, so
            # the measurement is never taken below what must be held.
            out["peak_bytes"] = max(*runs, held)
            out["resident_peaks"] = runs
            out["peak_memory_method"] = (
                "measured: the process's resident peak above its resident set before the run, "
                "the higher of two 3-epoch runs, freed blocks handed back as they are freed "
                "(torch keeps no CPU allocator statistics); at least parameters + gradients + "
                "data + saved activations")
        else:  # no /proc high-water mark here: count what the epoch must hold
            blocks = 1 if loop == "no-autograd" else 2  # it writes gradients over spent
            out["peak_bytes"] = held + blocks * n * width * item  # activations (handgrad)
            out["peak_memory_method"] = ("estimate: parameters + gradients + data + saved "
                                         f"activations + {blocks} (N, width) gradient buffers")
        return out

    _warmed = False

    def _warm_host(self) -> None:
        """One tiny training run before the first CPU memory measurement: torch's one-time
        set-up (thread pools, MKL's buffers: ~100-250 MiB here) would otherwise count
        towards whichever point is measured first."""
        if not _Torch._warmed:
            x, y, w, _ = workload("none", 64, 16, 2, 0)
            via_train("torch", "eager", self.device_arg, False, None)(w, x, y, 1e-4, False, 3, 3)
            _Torch._warmed = True

    def matmul(self, size, dtype, repeats):
        return self.loops.matmul_seconds(size, getattr(self.torch, dtype), self.device, repeats)

    def floor(self, n, width, depth, dtype, repeats):
        return self.loops.floor_seconds(n, width, depth, getattr(self.torch, dtype), self.device,
                                        repeats)


# ---- threads ------------------------------------------------------------------------

def pin_threads(threads: int | None) -> int:
    """Pin this process to `threads` cores before any framework starts its pools.

    XLA's CPU client sizes its thread pool to the cores the process may run on
    (sched_getaffinity), and torch takes set_num_threads; pinning the affinity and setting
    torch to the same count gives both frameworks the same cores and the same count.
    Returns the count in use.
    """
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    if cores is None:
        return threads or (os.cpu_count() or 1)
    if threads:
        if threads > len(cores):
            raise UsageError(f"--threads {threads}: only {len(cores)} cores are available")
        os.sched_setaffinity(0, cores[:threads])
        return threads
    return len(cores)


# ---- measuring ----------------------------------------------------------------------

def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "all": list(values)}


def initial_weights(width: int, depth: int, seed: int, dtype: str = "float32") -> dict:
    """Weights drawn by numpy from torch's default law (U(-1/sqrt(fan_in), +)), so that the
    benchmark needs neither framework's initialiser; every variant starts from them."""
    from hetcore.interchange import shapes

    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes(width, depth).items():
        fan_in = shape[1] if len(shape) == 2 else None
        if fan_in is None:  # a bias: the fan-in of its layer's weight
            fan_in = shapes(width, depth)[name.replace(".bias", ".weight")][1]
        bound = 1.0 / math.sqrt(fan_in)
        out[name] = rng.uniform(-bound, bound, shape).astype(dtype)
    return out


def workload(preset: str, n_points: int, width: int, depth: int, seed: int | None):
    """(x, y, weights, description) for the benchmark, float32."""
    from hetcore import data, interchange
    from hetcore.settings import Settings

    s = Settings(preset=preset, seed=seed, n_points=n_points, width=width, depth=depth)
    ds = data.for_settings(s)
    x, y = ds.columns("float32")
    if s.lecture_weights:
        w, src = interchange.cast(interchange.lecture_weights(), "float32"), "lecture"
    else:
        w, src = initial_weights(width, depth, s.init_seed), f"numpy init(seed={s.init_seed})"
    return x, y, w, {"data": ds.source, "weights": src}


def references(fws: dict, n: int, width: int, depth: int, size: int, repeats: int) -> dict:
    """Each library's float32 matmul peak and matmul floor; the best of each is the
    device's (SPEC section 6)."""
    peak, floor = {}, {}
    for name, fw in fws.items():
        _settle(name)
        t = fw.matmul(size, "float32", repeats)
        peak[name] = {"gflops": 2 * size ** 3 / min(t) / 1e9,
                      "gflops_median": 2 * size ** 3 / statistics.median(t) / 1e9}
        f = fw.floor(n, width, depth, "float32", repeats)
        floor[name] = {"ms": 1e3 * min(f), "ms_median": 1e3 * statistics.median(f)}
    best_peak = max(peak, key=lambda k: peak[k]["gflops"])
    best_floor = min(floor, key=lambda k: floor[k]["ms"])
    return {
        "peak": {"size": size, **peak, "best": {"library": best_peak,
                                                  "gflops": peak[best_peak]["gflops"]}},
        "floor": {**floor, "best": {"library": best_floor, "ms": floor[best_floor]["ms"]},
                  "matmul_flops": matmul_flops(n, width, depth)},
    }


def peak_again(fws: dict, before: dict, repeats: int) -> dict:
    """The best library's peak measured again after the variants: how far the machine's
    speed drifted while they ran (a shared or throttled machine moves every figure)."""
    lib = before["best"]["library"]
    _settle(lib)
    t = fws[lib].matmul(before["size"], "float32", repeats)
    gflops = 2 * before["size"] ** 3 / min(t) / 1e9
    return {"library": lib, "gflops": gflops,
            "drift": gflops / before["best"]["gflops"] - 1}


def matmul_flops(n: int, width: int, depth: int) -> int:
    """FLOPs of one epoch's matrix products (forward, weight and input gradients)."""
    fwd = 2 * n * width + 2 * n * width * width * (depth - 1) + 2 * 2 * n * width
    wgrad = fwd
    igrad = 2 * n * width * width * (depth - 1) + 2 * 2 * n * width
    return fwd + wgrad + igrad


def _time_variants(variants, w, x, y, lr, full, epochs, chunk, repeats, log) -> list[dict]:
    """Compile each variant, then time `repeats` whole runs of each, round-robin."""
    rows, runs = [], []
    for v in variants:
        try:
            compile_s, run = v.trial(w, x, y, lr, full, epochs, chunk)
        except UsageError:
            raise
        except Exception as e:  # noqa: BLE001 - a variant that cannot run is reported
            rows.append({"name": v.name, "framework": v.framework, "loop": v.loop,
                         "remat": v.remat, "error": _short(e)})
            runs.append(None)
            log(f"  {v.name}: failed: {_short(e)}")
            continue
        rows.append({"name": v.name, "framework": v.framework, "loop": v.loop, "remat": v.remat,
                     "compile_s": compile_s, "seconds": []})
        runs.append(run)
        log(f"  {v.name}: compiled/warmed up in {compile_s:.2f} s")
    # Round-robin over every variant, so that the machine's drift (here up to 15% within a
    # run) falls on both frameworks alike; a pause whenever the framework changes, since
    # torch's OpenMP threads spin for a while after each op and would steal the cores from
    # XLA's pool (and the other way round).
    for r in range(repeats):
        for fw in dict.fromkeys(row["framework"] for row in rows):
            _settle(fw)
            for row, run in zip(rows, runs):
                if run is None or row["framework"] != fw:
                    continue
                seconds, history, final = run()
                row["seconds"].append(seconds)
                if r == 0:
                    row["history"], row["final_loss"] = history, final
            log(f"  {fw} repeat {r + 1}/{repeats}: " + ", ".join(
                f"{row['name']} {1e3 * row['seconds'][-1] / epochs:.3f}"
                for row in rows if row["framework"] == fw and row.get("seconds")) + " ms/epoch")
    for row in rows:
        if "seconds" in row:
            per = [s / epochs for s in row["seconds"]]
            row["ms_per_epoch"] = {k: (1e3 * v if k != "all" else [1e3 * t for t in v])
                                   for k, v in _stats(per).items()}
            row["run_s"] = row["compile_s"] + statistics.median(row["seconds"])
    return rows


_last_framework = [None]


def _settle(framework: str) -> None:
    """Pause when the framework changes, so that the other one's threads go idle."""
    if _last_framework[0] not in (None, framework):
        time.sleep(SETTLE_S)
    _last_framework[0] = framework


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def agreement(rows: list[dict], check_epochs: int, f64: dict | None) -> dict:
    """Whether every variant trained the same run as the first one."""
    ok_rows = [r for r in rows if "history" in r]
    if not ok_rows:
        return {"ok": False, "reference": None, "failures": ["no variant ran"]}
    ref = ok_rows[0]
    failures = []
    k = min(check_epochs, len(ref["history"]))
    for r in rows:
        if "error" in r:
            failures.append(f"{r['name']}: did not run ({r['error']})")
            continue
        gap = float(np.max(np.abs(np.asarray(r["history"][:k], np.float64)
                                  - np.asarray(ref["history"][:k], np.float64))))
        r["check"] = {"float32_epochs": k, "float32_max_gap": gap}
        if not math.isfinite(r["final_loss"]) or not gap <= CHECK_ATOL:
            failures.append(f"{r['name']}: float32 losses of the first {k} epochs differ from "
                            f"{ref['name']}'s by up to {gap:.3g} (allowed {CHECK_ATOL:g})")
        if f64 is not None and r["name"] in f64:
            r["check"]["float64_final_loss"] = f64[r["name"]]
            r0 = f64.get(ref["name"])
            if r0 is None or not abs(f64[r["name"]] - r0) <= F64_RTOL * max(1.0, abs(r0)):
                failures.append(f"{r['name']}: float64 final loss {f64[r['name']]!r} differs "
                                f"from {ref['name']}'s {r0!r} (allowed rtol {F64_RTOL:g})")
    return {"ok": not failures, "reference": ref["name"], "float32_epochs": k,
            "float32_atol": CHECK_ATOL, "float64_rtol": F64_RTOL if f64 is not None else None,
            "failures": failures}


def float64_finals(variants, w, x, y, lr, full, epochs, chunk, log) -> dict:
    """Each variant's final loss when it trains the same run in float64."""
    from hetcore import interchange

    w64 = interchange.cast(w, "float64")
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    out = {}
    for v in variants:
        try:
            _, run = v.trial(w64, x64, y64, lr, full, epochs, chunk)
            out[v.name] = (run.first if hasattr(run, "first") else run())[2]
        except Exception as e:  # noqa: BLE001 - reported as a failed check
            log(f"  {v.name}: float64 check failed to run: {_short(e)}")
    return out


# ---- the report ---------------------------------------------------------------------

def fill_rates(rows: list[dict], flops: float, refs: dict) -> None:
    peak = refs["peak"]["best"]["gflops"]
    floor_ms = refs["floor"]["best"]["ms"]
    for r in rows:
        if "ms_per_epoch" not in r:
            continue
        med, best = r["ms_per_epoch"]["median"], r["ms_per_epoch"]["min"]
        r["gflops"] = flops / (med * 1e-3) / 1e9
        r["fraction_of_peak"] = r["gflops"] / peak
        r["fraction_of_peak_best"] = flops / (best * 1e-3) / 1e9 / peak
        r["floor_over_time"] = floor_ms / med


def table(report: dict) -> str:
    refs = report["references"]
    pk, fl = refs["peak"], refs["floor"]
    others = ", ".join(f"{k} {v['gflops']:.1f}" for k, v in pk.items() if k not in ("size", "best"))
    floors = ", ".join(f"{k} {v['ms']:.3f}" for k, v in fl.items()
                       if k not in ("best", "matmul_flops"))
    w = report["workload"]
    load = report.get("machine_load", {})
    lines = [
        f"device: {report['device']['name']} | threads {report['threads']} | "
        f"precision {report['precision']} | load average {load.get('start')} -> "
        f"{load.get('end')}",
        f"workload: N={w['n_points']} width={w['width']} depth={w['depth']} "
        f"epochs={w['epochs']} chunk={w['chunk_epochs']} | "
        f"{report['flops_per_epoch'] / 1e6:.1f} MFLOP/epoch (XLA cost analysis)",
        f"f32 matmul peak ({pk['size']}^3): {pk['best']['gflops']:.1f} GFLOP/s "
        f"({pk['best']['library']}; {others}) | matmul floor: {fl['best']['ms']:.3f} ms/epoch "
        f"({fl['best']['library']}; {floors})",
        *_drift_line(refs.get("peak_after")),
        "",
        f"{'variant':24s} {'compile s':>9s} {'ms/epoch median [min, max]':>28s} {'GFLOP/s':>8s} "
        f"{'% peak':>7s} {'floor/t':>7s} {'peak MiB':>9s} {'act MiB':>8s} {'final loss':>11s} "
        f"{'run s':>7s}",
    ]
    for r in report["variants"]:
        if "error" in r:
            lines.append(f"{r['name']:24s} failed: {r['error']}")
            continue
        m = r["ms_per_epoch"]
        mem = r.get("peak_bytes")
        act = r.get("activation_bytes")
        lines.append(
            f"{r['name']:24s} {r['compile_s']:9.2f} "
            f"{m['median']:9.3f} [{m['min']:7.3f}, {m['max']:7.3f}] "
            f"{r['gflops']:8.1f} {100 * r['fraction_of_peak']:6.1f}% "
            f"{100 * r['floor_over_time']:6.1f}% "
            f"{(mem / 2**20 if mem else float('nan')):9.2f} "
            f"{(act / 2**20 if act is not None else float('nan')):8.2f} "
            f"{r['final_loss']:11.6f} {r['run_s']:7.2f}")
    a = report["agreement"]
    lines.append("")
    lines.append("agreement: " + ("ok" if a["ok"] else "FAILED") +
                 f" (float32 first {a['float32_epochs']} epochs within {a['float32_atol']:g} of "
                 f"{a['reference']}" + (f"; float64 final losses within rtol {a['float64_rtol']:g}"
                                        if a.get("float64_rtol") else "") + ")")
    lines += [f"  {f}" for f in a["failures"]]
    best = report.get("fastest", {})
    if best:
        lines.append("fastest run, compile included: " + ", ".join(
            f"{k} {v['name']} ({v['run_s']:.2f} s)" for k, v in best.items()))
    return "\n".join(lines)


def _drift_line(after: dict | None) -> list[str]:
    if not after:
        return []
    line = (f"peak again after the variants: {after['gflops']:.1f} GFLOP/s "
            f"({100 * after['drift']:+.0f}%)")
    if abs(after["drift"]) > DRIFT_WARN:
        line += (" - the machine's speed moved while the variants ran: read every % of "
                 f"peak as uncertain by about {100 * abs(after['drift']):.0f}%")
    return [line]


def bench_figure(report: dict):
    from hetcore.figures import plt

    rows = [r for r in report["variants"] if "ms_per_epoch" in r]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), dpi=110)
    names = [r["name"] for r in rows]
    colors = ["#2E2585" if r["framework"] == "jax" else "#C2452D" for r in rows]
    med = np.array([r["ms_per_epoch"]["median"] for r in rows])
    lo = med - np.array([r["ms_per_epoch"]["min"] for r in rows])
    hi = np.array([r["ms_per_epoch"]["max"] for r in rows]) - med
    axes[0].barh(names, med, xerr=[lo, hi], color=colors)
    axes[0].axvline(report["references"]["floor"]["best"]["ms"], color="k", ls="--",
                    label="matmul floor")
    axes[0].set(xlabel="ms per epoch (median, min-max)", title="time per epoch")
    axes[0].legend()
    axes[0].invert_yaxis()
    axes[1].barh(names, [100 * r["fraction_of_peak"] for r in rows], color=colors)
    axes[1].axvline(100 * report["references"]["floor"]["matmul_flops"]
                    / (report["references"]["floor"]["best"]["ms"] * 1e-3)
                    / (report["references"]["peak"]["best"]["gflops"] * 1e9),
                    color="k", ls="--", label="matmul floor")
    axes[1].set(xlabel="% of measured f32 matmul peak", title=report["device"]["name"])
    axes[1].legend()
    axes[1].invert_yaxis()
    fig.tight_layout()
    return fig


# ---- the sweep ----------------------------------------------------------------------

def sweep(fws: dict, variants: list[Variant], points: list[int], widths: list[int], depth: int,
          repeats: int, peak_gflops: float, max_epoch_s: float, memory_limit: float,
          budget_bytes: float, log, repeat_s: float = 0.2, on_row=None) -> dict:
    """Time per epoch and memory at every (points, width); skipped where the estimated time
    per epoch exceeds `max_epoch_s` or the estimated memory `memory_limit` bytes.
    `on_row(rows)`, if given, is called after every row (the command saves the rows so far:
    a run cut short keeps what it measured)."""
    rows = []

    def add(row):
        rows.append(row)
        if on_row is not None:
            on_row(rows)

    for width in widths:
        for n in points:
            flops = matmul_flops(n, width, depth)
            est_s = flops / (0.3 * peak_gflops * 1e9)
            est_mem = 4 * (8 * n * width + 3 * (depth * width * (width + 1) + 2 * width))
            if est_s > max_epoch_s:
                add({"n_points": n, "width": width, "skipped":
                     f"estimated {est_s:.1f} s per epoch > --max-epoch-s {max_epoch_s:g}"})
                continue
            if est_mem > memory_limit:
                add({"n_points": n, "width": width, "skipped":
                     f"estimated {est_mem / GIB:.1f} GiB > the device's "
                     f"{memory_limit / GIB:.1f} GiB"})
                continue
            # Enough epochs per repeat to time (~repeat_s), at least 2, at most 200.
            epochs = int(min(200, max(2, repeat_s / max(est_s, 1e-9))))
            x, y, w, _ = workload("none", n, width, depth, 0)
            log(f"sweep N={n} width={width}: {epochs} epochs x {repeats}")
            for v in variants:
                row = {"n_points": n, "width": width, "name": v.name, "framework": v.framework,
                       "loop": v.loop, "remat": v.remat, "epochs": epochs,
                       "matmul_flops": flops}
                try:
                    timed = _time_variants([v], w, x, y, 1e-4, False, epochs, epochs,
                                           repeats, lambda s: None)[0]
                    if "error" in timed:
                        row["error"] = timed["error"]
                    else:
                        row["compile_s"] = timed["compile_s"]
                        row["ms_per_epoch"] = timed["ms_per_epoch"]
                        row["gflops"] = flops / (timed["ms_per_epoch"]["median"] * 1e-3) / 1e9
                        row["fraction_of_peak"] = row["gflops"] / peak_gflops
                        row.update(v.memory(w, x, y, 1e-4, False, epochs, epochs))
                except Exception as e:  # noqa: BLE001 - out of memory and the like
                    row["error"] = _short(e)
                _release(fws)
                add(row)
                log(f"  {v.name}: " + (row.get("error") or
                    f"{row['ms_per_epoch']['median']:.3f} ms/epoch, "
                    f"{100 * row['fraction_of_peak']:.1f}% of peak, "
                    f"peak {(row.get('peak_bytes') or 0) / 2**20:.1f} MiB"))
    return {"rows": rows, "largest": largest_points(rows, budget_bytes),
            "budget_bytes": budget_bytes, "depth": depth}


def _release(fws: dict) -> None:
    gc.collect()
    if "torch" in fws and fws["torch"].device.type == "cuda":
        fws["torch"].torch.cuda.empty_cache()


def largest_points(rows: list[dict], budget: float) -> list[dict]:
    """Per variant and width: the largest point count whose peak memory fits `budget`,
    from a straight line through the measured peaks (memory grows linearly in N)."""
    out = []
    keys = sorted({(r["name"], r["width"]) for r in rows if r.get("peak_bytes")})
    for name, width in keys:
        pts = sorted((r["n_points"], r["peak_bytes"]) for r in rows
                     if r.get("name") == name and r["width"] == width and r.get("peak_bytes"))
        if len(pts) < 2:
            continue
        (n0, b0), (n1, b1) = pts[-2], pts[-1]
        slope = (b1 - b0) / (n1 - n0)
        if slope <= 0:
            continue
        intercept = b1 - slope * n1
        out.append({"name": name, "width": width, "bytes_per_point": slope,
                    "fixed_bytes": intercept,
                    "largest_n_points": int((budget - intercept) // slope),
                    "method": f"estimated: line through the measured peaks at N={n0} and N={n1}",
                    "largest_measured": n1})
    return out


def sweep_figure(result: dict, peak_gflops: float, title: str):
    from hetcore.figures import plt

    rows = [r for r in result["rows"] if "ms_per_epoch" in r]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8), dpi=110)
    names = sorted({r["name"] for r in rows})
    widths = sorted({r["width"] for r in rows})
    markers = dict(zip(widths, "osD^vP*X"))
    for name in names:
        style = "--" if name.endswith("+remat") else "-"
        color = "#2E2585" if name.startswith("jax") else "#C2452D"
        for width in widths:  # one line per variant and width: N grows along it
            rs = sorted((r for r in rows if r["name"] == name and r["width"] == width),
                        key=lambda r: r["matmul_flops"])
            if not rs:
                continue
            f = np.array([r["matmul_flops"] for r in rs], dtype=float)
            kw = dict(color=color, marker=markers[width], alpha=0.8,
                      label=f"{name} w={width}")
            axes[0].loglog(f, [r["ms_per_epoch"]["median"] for r in rs], style, **kw)
            axes[1].semilogx(f, [100 * r["fraction_of_peak"] for r in rs], style, **kw)
            axes[2].loglog(f, [(r.get("peak_bytes") or np.nan) / 2**20 for r in rs], style,
                           **kw)
    if rows:
        lo = min(r["matmul_flops"] for r in rows)
        hi = max(r["matmul_flops"] for r in rows)
        ff = np.logspace(np.log10(lo), np.log10(hi), 20)
        axes[0].loglog(ff, 1e3 * ff / (peak_gflops * 1e9), "k:", label="at the f32 peak")
    axes[0].set(xlabel="FLOPs per epoch", ylabel="ms per epoch (median)", title=title)
    axes[1].set(xlabel="FLOPs per epoch", ylabel="% of measured f32 matmul peak",
                title="compute-bound where the curve flattens")
    axes[2].set(xlabel="FLOPs per epoch", ylabel="peak memory (MiB)",
                title="memory (dashed: rematerialised)")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


# ---- the command --------------------------------------------------------------------

def _ints(text: str, name: str) -> list[int]:
    try:
        vals = [int(float(v)) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{name}: expected comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise UsageError(f"{name}: expected positive integers, got {text!r}")
    return vals


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line `error: ...` (exit 2), as for UsageError."""

    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    from hetcore.settings import LECTURE

    p = _Parser(
        prog="bench.py",
        description="Benchmark every training loop of jaxhet and torchhet on one workload "
        "(the lecture's by default), against the device's float32 matmul peak and the "
        "epoch's matmul floor measured in the same run; --sweep scans points x width.")
    p.add_argument("--device", default="auto", help="auto (default), cpu or gpu")
    p.add_argument("--variants", default="all",
                   help="comma-separated framework:loop names (e.g. jax:scan,torch:optim); "
                   "'all' (default) takes every loop the device has")
    p.add_argument("--epochs", type=int, default=LECTURE["epochs"])
    p.add_argument("--n-points", type=int, default=LECTURE["n_points"])
    p.add_argument("--width", type=int, default=LECTURE["width"])
    p.add_argument("--depth", type=int, default=LECTURE["depth"])
    p.add_argument("--preset", default="lecture", choices=("lecture", "none"))
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--lr", type=float, default=LECTURE["lr"])
    p.add_argument("--chunk-epochs", type=int, default=100,
                   help="epochs per chunk, as the train command's option (default 100)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per variant (>= 5)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for both frameworks (default: every core available)")
    p.add_argument("--precision", default="float32", choices=("float32", "tf32"),
                   help="float32 (default: true float32 products in both frameworks); tf32 "
                   "lets torch use TF32 on CUDA (labelled; jaxhet's layers keep HIGHEST)")
    p.add_argument("--peak-size", type=int, default=None,
                   help="side of the square product for the peak (default 2048 on CPU, 4096 "
                   "on GPU)")
    p.add_argument("--check", default="float64", choices=("float64", "float32"),
                   help="float64 (default): also retrain every variant in float64 and require "
                   "equal final losses; float32: the float32 early-epoch check only")
    p.add_argument("--remat", action="store_true",
                   help="also time every variant with rematerialisation")
    p.add_argument("--unroll", default=None,
                   help="jax scan unroll; a comma-separated list times scan at each (default: "
                   "jaxhet's own, jaxhet.loops.UNROLL)")
    p.add_argument("--sweep", action="store_true", help="run the scaling sweep instead")
    p.add_argument("--points", default="500,5000,50000,500000,1000000",
                   help="sweep point counts (comma-separated)")
    p.add_argument("--widths", default="64,256,1024,4096", help="sweep widths")
    p.add_argument("--max-epoch-s", type=float, default=None,
                   help="sweep: skip points estimated slower per epoch (default 1 s on CPU, "
                   "10 s on GPU)")
    p.add_argument("--repeat-seconds", type=float, default=0.2,
                   help="sweep: about how long one timed repeat runs (default 0.2)")
    p.add_argument("--memory-gib", type=float, default=24.0,
                   help="memory budget for the largest trainable point count (default 24)")
    p.add_argument("--out", default=None, help="output directory (default runs/bench-<time>)")
    return p


def _check_args(args) -> None:
    for name in ("epochs", "n_points", "width", "depth", "chunk_epochs"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')}: must be at least 1")
    if args.repeats < 1:
        raise UsageError("--repeats: must be at least 1")
    if args.device not in ("auto", "cpu", "gpu"):
        raise UsageError(f"--device {args.device}: choose auto, cpu or gpu")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise UsageError(f"--lr: must be finite and positive, got {args.lr}")
    if args.threads is not None and args.threads < 1:
        raise UsageError("--threads: must be at least 1")
    if args.memory_gib <= 0:
        raise UsageError("--memory-gib: must be positive")
    if not args.repeat_seconds > 0:
        raise UsageError("--repeat-seconds: must be positive")
    if args.max_epoch_s is not None and not args.max_epoch_s > 0:
        raise UsageError("--max-epoch-s: must be positive")
    if args.unroll is not None:
        _ints(args.unroll, "--unroll")
    if args.sweep:
        _ints(args.points, "--points")
        _ints(args.widths, "--widths")


def _frameworks(device: str, threads: int, tf32: bool, wanted: set) -> dict:
    fws = {}
    if "jax" in wanted:
        try:
            fws["jax"] = _Jax(device)
        except ImportError as e:
            raise UsageError(f"jax: cannot import it ({e})") from None
    if "torch" in wanted:
        try:
            fws["torch"] = _Torch(device, threads, tf32)
        except ImportError as e:
            raise UsageError(f"torch: cannot import it ({e})") from None
    kinds = {fw.kind for fw in fws.values()}
    if len(kinds) > 1:
        raise UsageError(f"--device {device}: the frameworks see different devices "
                         f"({', '.join(f'{k} {v.describe}' for k, v in fws.items())}); "
                         "name one with --device")
    return fws


def select_variants(spec: str, fws: dict, remat: bool, unroll: list[int] | None,
                    extra: dict | None) -> list[Variant]:
    """The variants `spec` names that can run here; JAX's scan once per `unroll` value."""
    kind = next(iter(fws.values())).kind if fws else "cpu"
    names = list(CUDA_VARIANTS if kind == "gpu" else CPU_VARIANTS) if spec == "all" else \
        [s.strip() for s in spec.split(",") if s.strip()]
    out = []
    for name in names:
        fw, _, loop = name.partition(":")
        if fw not in ("jax", "torch"):
            raise UsageError(f"--variants {name}: expected framework:loop, e.g. jax:scan")
        if fw not in fws:
            continue
        from hetcore.settings import LOOPS, NO_REMAT

        if loop not in LOOPS[fw]:
            raise UsageError(f"--variants {name}: {fw} has {', '.join(LOOPS[fw])}")
        if fw == "torch" and loop in fws[fw].loops.CUDA_ONLY and kind != "gpu":
            raise UsageError(f"--variants {name}: needs a CUDA device; torch is on {kind}")
        if fw == "jax" and loop == "scan":
            out += [fws[fw].variant(loop, False, k) for k in dict.fromkeys(unroll or [None])]
        else:
            out.append(fws[fw].variant(loop, False))
        if remat and loop not in NO_REMAT:
            out.append(fws[fw].variant(loop, True))
    for name, trial in (extra or {}).items():
        out.append(Variant(name, "extra", name, trial))
    if not out:
        raise UsageError(f"--variants {spec}: none of them can run here")
    return out


def run(args, extra_variants: dict | None = None, log=print) -> int:
    """The benchmark or the sweep as `args` say; returns the exit status."""
    _check_args(args)
    threads = pin_threads(args.threads)
    host_malloc = hostmem.keep_freed_memory()  # both frameworks alike, before either starts
    # JAX must not take most of a GPU's memory up front: torch shares the device.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    spec = args.variants
    wanted = {"jax", "torch"} if spec == "all" else \
        {s.split(":")[0] for s in spec.split(",") if s.strip()}
    fws = _frameworks(args.device, threads, args.precision == "tf32", wanted & {"jax", "torch"})
    if not fws:
        raise UsageError(f"--variants {spec}: names no framework (jax, torch)")
    kind = next(iter(fws.values())).kind
    unroll = None if args.unroll is None else _ints(args.unroll, "--unroll")
    variants = select_variants(spec, fws, args.remat, unroll, extra_variants)
    out = args.out or os.path.join("runs", time.strftime("bench-%Y%m%d-%H%M%S"))
    os.makedirs(out, exist_ok=True)
    size = args.peak_size or (4096 if kind == "gpu" else 2048)
    load_start = _load()
    device = {"kind": kind, "name": next(iter(fws.values())).describe,
              **{k: v.describe for k, v in fws.items()}, "machine": platform.machine(),
              "cpu_count": os.cpu_count()}
    precision = ("float32 (JAX Precision.HIGHEST, torch matmul precision 'highest': no TF32)"
                 if args.precision == "float32" else
                 "tf32 for torch on CUDA (labelled option); JAX keeps HIGHEST")
    versions = {"python": platform.python_version(), "numpy": np.__version__,
                **{k: v.version() for k, v in fws.items()}}
    log(f"device {device['name']}, {threads} threads; references ...")
    refs = references(fws, args.n_points, args.width, args.depth, size, max(args.repeats, 5))
    peak = refs["peak"]["best"]["gflops"]
    log(f"  f32 peak {peak:.1f} GFLOP/s ({refs['peak']['best']['library']}), floor "
        f"{refs['floor']['best']['ms']:.3f} ms ({refs['floor']['best']['library']})")

    if args.sweep:
        max_s = args.max_epoch_s or (10.0 if kind == "gpu" else 1.0)
        limit = _memory_limit(fws, kind)
        head = {"device": device, "threads": threads, "precision": precision,
                "host_malloc": host_malloc, "references": refs, "versions": versions,
                "environment": {k: os.environ[k] for k in ENV_KEYS if k in os.environ}}
        path = os.path.join(out, "sweep.json")

        def save_partial(rows):  # a sweep cut short (a time limit) keeps its points
            _write_json(path, {**head, "complete": False, "rows": rows})

        result = sweep(fws, variants, _ints(args.points, "--points"),
                       _ints(args.widths, "--widths"), args.depth, args.repeats, peak, max_s,
                       limit, args.memory_gib * GIB, log, args.repeat_seconds, save_partial)
        report = {**head, "complete": True,
                  "machine_load": {"start": load_start, "end": _load()}, **result}
        _write_json(path, report)
        from hetcore.figures import save

        save(sweep_figure(result, peak, device["name"]), os.path.join(out, "sweep"))
        for r in result["largest"]:
            log(f"largest N in {args.memory_gib:g} GiB: {r['name']} width {r['width']}: "
                f"{r['largest_n_points']:,} ({r['bytes_per_point']:.0f} B/point, {r['method']})")
        log(f"wrote {out}/sweep.json, sweep.png, sweep.svg")
        return 0

    x, y, w, source = workload(args.preset, args.n_points, args.width, args.depth, args.seed)
    flops = (fws["jax"].flops(w, x, y, args.lr, False) if "jax" in fws
             else float(matmul_flops(args.n_points, args.width, args.depth)))
    log(f"  {flops / 1e6:.1f} MFLOP per epoch; timing {len(variants)} variants x "
        f"{args.repeats} runs of {args.epochs} epochs")
    rows = _time_variants(variants, w, x, y, args.lr, False, args.epochs, args.chunk_epochs,
                          args.repeats, log)
    for v, r in zip(variants, rows):
        if "error" not in r and v.memory is not None:
            try:
                r.update(v.memory(w, x, y, args.lr, False, args.chunk_epochs, args.epochs))
            except Exception as e:  # noqa: BLE001 - memory is reported, not required
                r["memory_error"] = _short(e)
    fill_rates(rows, flops, refs)
    f64 = None
    if args.check == "float64":
        log("  float64 check runs ...")
        f64 = float64_finals(variants, w, x, y, args.lr, False, args.epochs, args.chunk_epochs,
                             log)
    agree = agreement(rows, CHECK_EPOCHS, f64)
    refs["peak_after"] = peak_again(fws, refs["peak"], max(args.repeats, 5))
    fastest = {}
    for fw in fws:
        ok = [r for r in rows if r["framework"] == fw and "run_s" in r and not r["remat"]]
        if ok:
            b = min(ok, key=lambda r: r["run_s"])
            fastest[fw] = {"name": b["name"], "run_s": b["run_s"]}
    for r in rows:
        if "history" in r:
            r["loss_history_head"] = [float(v) for v in r["history"][:10]]
            r["final_history_loss"] = float(r["history"][-1])
            del r["history"]
    report = {
        "device": device, "threads": threads, "precision": precision,
        "host_malloc": host_malloc,
        "workload": {"n_points": args.n_points, "width": args.width, "depth": args.depth,
                     "epochs": args.epochs, "lr": args.lr, "chunk_epochs": args.chunk_epochs,
                     "dtype": "float32", **source},
        "flops_per_epoch": flops,
        "flops_source": "XLA cost analysis of jaxhet's compiled epoch" if "jax" in fws else
        "matrix products counted (jax absent)",
        "references": refs, "repeats": args.repeats, "variants": rows, "agreement": agree,
        "fastest": fastest, "versions": versions,
        "machine_load": {"start": load_start, "end": _load(), "threads": threads,
                         "note": "1-minute load averages; above the thread count the machine "
                         "was shared and every time is inflated (torch's OpenMP barriers "
                         "suffer most)"},
        "environment": {k: os.environ[k] for k in ENV_KEYS if k in os.environ},
    }
    text = table(report)
    _write_json(os.path.join(out, "bench.json"), report)
    with open(os.path.join(out, "bench.txt"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    from hetcore.figures import save

    save(bench_figure(report), os.path.join(out, "bench"))
    log(text)
    log(f"wrote {out}/bench.json, bench.txt, bench.png, bench.svg")
    if not agree["ok"]:
        print("error: variants disagree: " + "; ".join(agree["failures"]), file=sys.stderr)
        return 1
    return 0


ENV_KEYS = ("HET_HOST_MALLOC", "OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS",
            "XLA_FLAGS", "XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_ALLOCATOR")


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _memory_limit(fws: dict, kind: str) -> float:
    if kind == "gpu" and "torch" in fws:
        free, total = fws["torch"].torch.cuda.mem_get_info(fws["torch"].device)
        return 0.9 * total
    if kind != "cpu" and "jax" in fws:  # JAX alone on an accelerator: its allocator's limit
        stats = fws["jax"].device.memory_stats() or {}
        if stats.get("bytes_limit"):
            return 0.9 * stats["bytes_limit"]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return 0.8 * int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * GIB


def _write_json(path: str, obj) -> None:
    from hetcore.outputs import write_json

    write_json(path, _clean(obj))


def _clean(obj):
    """JSON-safe: numpy scalars to Python, non-finite floats to None."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    return obj


def _log(text: str) -> None:
    print(text, flush=True)


def main(argv: list[str] | None = None, extra_variants: dict | None = None) -> int:
    """scripts/bench.py: exit 0 when every variant agrees, 1 when one does not, 2 on bad
    usage (one line `error: ...` on stderr)."""
    args = build_parser().parse_args(argv)
    try:
        return run(args, extra_variants, log=_log)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
