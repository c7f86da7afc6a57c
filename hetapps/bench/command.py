"""The benchmark command: options, the run, and its exit status (0 when every variant
agrees, 1 when one does not, 2 on bad usage with one line `error: ...`)."""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time

import numpy as np

from hetapps import options
from hetapps.bench import devices as dv
from hetapps.bench import report as rep
from hetapps.bench import sweep as sw
from hetapps.bench.memory import variant_memory
from hetapps.bench.references import epoch_flops, peak_again, references, workload
from hetapps.bench.timing import Settle, float64_finals, pin_threads, short, time_variants
from hetapps.bench.variants import Framework, select
from hetcore import hostmem
from hetcore.errors import UsageError
from hetcore import outputs
from hetcore.outputs import write_json
from hetcore.settings import BACKENDS, MAX_DEVICES, check_memory

ENV_KEYS = ("HET_HOST_MALLOC", "OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS",
            "XLA_FLAGS", "XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_ALLOCATOR")
PRECISION_NOTES = {
    "highest": "float32 (JAX Precision.HIGHEST, torch matmul precision 'highest': no TF32)",
    "tf32": "tf32 (labelled option: JAX Precision.DEFAULT, torch matmul precision 'high': "
            "TF32 products where the device has them); the peak and floor stay float32",
}


def build_parser() -> argparse.ArgumentParser:
    p = options.Parser(
        prog="bench.py",
        description="Benchmark every training loop of jaxhet and torchhet on one workload "
        "(the lecture's by default), against the device's float32 matmul peak and the "
        "epoch's matmul floor measured in the same run; --sweep scans points x width.")
    # The run's own options; a variant brings its loop, float32 and float64 are both run
    # (the agreement check), and --remat here times every variant both ways.
    # --devices: one device's loops are timed here; data-parallel runs by the train command.
    options.add_settings(p, exclude=("framework", "dtype", "full", "data", "test_data",
                                     "init_from", "loop", "checkpoint_every", "remat",
                                     "devices"))
    p.add_argument("--variants", default="all",
                   help="comma-separated framework:loop names (e.g. jax:scan,torch:optim); "
                   "'all' (default) takes every loop the device has")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed runs per variant (default 5; the references take at least 5)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for both frameworks (default: every core available)")
    p.add_argument("--precision", default="float32", choices=("float32", "tf32"),
                   help="float32 (default: true float32 products in both frameworks); tf32 "
                   "lets both use TF32 products where the device has them (labelled)")
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
                   "1, jaxhet's own)")
    p.add_argument("--sweep", action="store_true", help="run the scaling sweep instead")
    p.add_argument("--data-parallel", metavar="COUNTS", default=None,
                   help="time the train command with --devices at each of these counts "
                   "(e.g. 1,2,4) instead of the loops, at --epochs and twice as many; the "
                   "frameworks are those --variants names")
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


def _ints(text: str, name: str) -> list[int]:
    try:
        vals = [int(float(v)) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{name}: expected comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise UsageError(f"{name}: expected positive integers, got {text!r}")
    return vals


def _positive(args, *names) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise UsageError(f"{options.flag(name)}: must be positive and finite, got {value}")


# Past these a request is a mistake, refused before any work: each repeat is a whole run of
# every variant; the peak's three square matrices of 16384 take 3 GiB in float32.
MAX_REPEATS = 1000
MAX_PEAK_SIZE = 16384
MAX_THREADS = 4096


def _at_most(name: str, value, low: int, high: int) -> None:
    if value is not None and not low <= value <= high:
        raise UsageError(f"{name}: must be from {low} to {high}, got {value}")


def check_args(args) -> None:
    """The benchmark's own options (the run's are checked as Settings)."""
    _at_most("--repeats", args.repeats, 1, MAX_REPEATS)
    _at_most("--threads", args.threads, 1, MAX_THREADS)
    _at_most("--peak-size", args.peak_size, 1, MAX_PEAK_SIZE)
    _positive(args, "memory_gib", "repeat_seconds", "max_epoch_s")
    if args.unroll is not None:
        _ints(args.unroll, "--unroll")
    if args.sweep:
        _ints(args.points, "--points")
        _ints(args.widths, "--widths")
    if args.data_parallel is not None:
        counts = _ints(args.data_parallel, "--data-parallel")
        if args.sweep:
            raise UsageError("--data-parallel: times the train command, not the sweep; drop "
                             "one of them")
        if max(counts) > MAX_DEVICES:
            raise UsageError(f"--data-parallel: at most {MAX_DEVICES} devices, got "
                             f"{max(counts)}")
        if 1 not in counts:
            raise UsageError(f"--data-parallel {args.data_parallel}: needs 1 (the run the "
                             "others are checked against)")


def load_frameworks(device: str, threads: int, wanted: set) -> dict[str, Framework]:
    """The frameworks the variants name, on one device, each computing on `threads`."""
    fws = {name: Framework.load(name, device) for name in BACKENDS if name in wanted}
    for fw in fws.values():
        fw.measure.set_threads(threads)
    if len({fw.kind for fw in fws.values()}) > 1:
        raise UsageError(f"--device {device}: the frameworks see different devices "
                         f"({', '.join(f'{k} {v.describe}' for k, v in fws.items())}); "
                         "name one with --device")
    return fws


def memory_limit(fws: dict[str, Framework]) -> float:
    """Bytes a sweep point may need: 90% of an accelerator's memory, else 80% of the host's
    available memory."""
    fw = next(iter(fws.values()))
    if fw.kind != "cpu":
        return 0.9 * min(f.backend.memory_bytes(f.backend.resolve_device(f.device))
                         for f in fws.values())
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return 0.8 * int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * sw.GIB


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def run(args, extra_variants: dict | None = None, log=print) -> int:
    """The benchmark or the sweep as `args` say; returns the exit status."""
    check_args(args)
    base = options.settings(args, framework="both")
    if base.ensemble > 1 and args.sweep:
        raise UsageError("--ensemble: the sweep times one model; drop --sweep or --ensemble")
    threads = pin_threads(args.threads)
    host_malloc = hostmem.keep_freed_memory()  # both frameworks alike, before either starts
    # JAX must not take most of a GPU's memory up front: torch shares the device.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    spec = args.variants
    wanted = set(BACKENDS) if spec == "all" else \
        {s.split(":")[0] for s in spec.split(",") if s.strip()}
    fws = load_frameworks(base.device, threads, wanted)
    if not fws:
        raise UsageError(f"--variants {spec}: names no framework ({', '.join(BACKENDS)})")
    kind = next(iter(fws.values())).kind
    unroll = None if args.unroll is None else _ints(args.unroll, "--unroll")
    precision = {"float32": "highest", "tf32": "tf32"}[args.precision]  # EngineOptions'
    variants = select(spec, fws, args.remat, unroll, precision, extra_variants, base.ensemble)
    out = os.path.join("runs", time.strftime("bench-%Y%m%d-%H%M%S")) if args.out is None \
        else args.out
    outputs.check_out(out, overwrite=True)  # the benchmark's files replace their namesakes
    if not args.sweep:  # (the sweep skips its points that would not fit, and says so)
        widest = base.replace(dtype="float64" if args.check == "float64" else "float32")
        check_memory(widest, base.n_points, memory_limit(fws),
                     next(iter(fws.values())).describe)
        x, y, w, source = workload(base)
        base.check_run(len(x))  # a warm-up the run would not outlast
    os.makedirs(out, exist_ok=True)  # every refusal above comes before anything is written
    size = args.peak_size or (4096 if kind == "gpu" else 2048)
    load_start = _load()
    device = {"kind": kind, "name": next(iter(fws.values())).describe,
              **{k: v.describe for k, v in fws.items()}, "machine": platform.machine(),
              "cpu_count": os.cpu_count()}
    versions = {"python": platform.python_version(), "numpy": np.__version__}
    for fw in fws.values():
        versions.update(fw.backend.versions())
    settle = Settle()
    log(f"device {device['name']}, {threads} threads; references ...")
    batch = None if base.full_batch(base.n_points) else base.batch_size
    refs = references(fws, base.n_points, base.width, base.depth, size, max(args.repeats, 5),
                      settle, batch, base.ensemble)
    peak = refs["peak"]["best"]["gflops"]
    log(f"  f32 peak {peak:.1f} GFLOP/s ({refs['peak']['best']['library']}), floor "
        f"{refs['floor']['best']['ms']:.3f} ms ({refs['floor']['best']['library']})")
    head = {"device": device, "threads": threads, "precision": PRECISION_NOTES[precision],
            "host_malloc": host_malloc, "references": refs, "versions": versions,
            "environment": {k: os.environ[k] for k in ENV_KEYS if k in os.environ}}

    if args.sweep:
        max_s = args.max_epoch_s or (10.0 if kind == "gpu" else 1.0)
        path = os.path.join(out, "sweep.json")

        def save_partial(rows):  # a sweep cut short (a time limit) keeps its points
            write_json(path, {**head, "complete": False, "rows": rows})

        result = sw.sweep(fws, variants, _ints(args.points, "--points"),
                          _ints(args.widths, "--widths"), base.depth, args.repeats, peak,
                          max_s, memory_limit(fws), args.memory_gib * sw.GIB, log,
                          args.repeat_seconds, save_partial, settle)
        write_json(path, {**head, "complete": True,
                          "machine_load": {"start": load_start, "end": _load()}, **result})
        from hetcore.figures import save

        save(sw.sweep_figure(result, peak, device["name"]), os.path.join(out, "sweep"))
        for r in result["largest"]:
            log(f"largest N in {args.memory_gib:g} GiB: {r['name']} width {r['width']}: "
                f"{r['largest_n_points']:,} ({r['bytes_per_point']:.0f} B/point, {r['method']})")
        log(f"wrote {out}/sweep.json, sweep.png, sweep.svg")
        return 0

    if base.ensemble > 1 or batch is not None:
        # XLA's cost analysis counts a loop's body once: an epoch of batches (a scan) or
        # an ensemble's members (a map) would be undercounted; count the products
        flops, flops_source = float(refs["floor"]["matmul_flops"]), (
            "matrix products counted" + (f", {base.ensemble} members" if base.ensemble > 1
                                         else f", batches of {batch}"))
    else:
        flops, flops_source = epoch_flops(fws, base.replace(dtype="float32"), x, y, w)
    stable = base.plain_sgd and base.full_batch(len(x))
    f64, skipped = None, []
    counts = None if args.data_parallel is None else _ints(args.data_parallel,
                                                           "--data-parallel")
    if counts is not None:
        log(f"  {flops / 1e6:.1f} MFLOP per epoch; the train command at --devices "
            f"{args.data_parallel}, {base.epochs} and {2 * base.epochs} epochs, best of "
            f"{args.repeats}")
        rows, skipped = dv.time_devices(options.given(args), fws, kind, counts,
                                        base.epochs, args.repeats, log)
        agree = dv.agreement(rows, stable)
    else:
        log(f"  {flops / 1e6:.1f} MFLOP per epoch; timing {len(variants)} variants x "
            f"{args.repeats} runs of {base.epochs} epochs")
        rows = time_variants(variants, w, x, y, base, args.repeats, log, settle)
        for v, r in zip(variants, rows):
            if "error" not in r and v.fw is not None:
                try:
                    r.update(variant_memory(v, w, x, y, base))
                except Exception as e:  # noqa: BLE001 - memory is reported, not required
                    r["memory_error"] = short(e)
        if args.check == "float64":
            log("  float64 check runs ...")
            f64 = float64_finals(variants, w, x, y, base, log)
        agree = rep.agreement(rows, rep.CHECK_EPOCHS, f64, stable=stable)
    rep.fill_rates(rows, flops, refs)
    refs["peak_after"] = peak_again(fws, refs["peak"], max(args.repeats, 5), settle)
    fastest = {}
    for fw in fws:
        ok = [r for r in rows if r["framework"] == fw and "run_s" in r and not r["remat"]]
        if ok:
            b = min(ok, key=lambda r: r["run_s"])
            fastest[fw] = {"name": b["name"], "run_s": b["run_s"]}
    speedup = {}  # an ensemble's program against K single runs, per framework
    for fw in fws:
        times = {r["loop"]: r["ms_per_epoch"]["median"] for r in rows
                 if r["framework"] == fw and "ms_per_epoch" in r}
        programs = [t for loop, t in times.items() if loop.startswith("ensemble")]
        if "singles" in times and programs:  # the fastest way of its one program
            speedup[fw] = times["singles"] / min(programs)
    for r in rows:
        if "history" in r:
            r["loss_history_head"] = [float(v) for v in r["history"][:10]]
            r["final_history_loss"] = float(r["history"][-1])
            del r["history"]
    report = {
        **head,
        "workload": {"n_points": base.n_points, "width": base.width, "depth": base.depth,
                     "epochs": base.epochs, "lr": base.lr, "chunk_epochs": base.chunk_epochs,
                     "dtype": "float32", "settings": base.to_dict(), **source},
        "flops_per_epoch": flops, "flops_source": flops_source,
        "repeats": args.repeats, "variants": rows, "agreement": agree, "fastest": fastest,
        "ensemble_speedup_over_singles": speedup,
        **({} if counts is None else {
            "data_parallel": {"counts": counts,
                              "skipped": skipped, "speedup_over_one_device":
                              dv.speedups(rows), "method": dv.METHOD}}),
        "machine_load": {"start": load_start, "end": _load(), "threads": threads,
                         "note": "1-minute load averages; above the thread count the machine "
                         "was shared and every time is inflated (torch's OpenMP barriers "
                         "suffer most)"},
    }
    text = rep.table(report)
    write_json(os.path.join(out, "bench.json"), report)
    with open(os.path.join(out, "bench.txt"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    from hetcore.figures import save

    save(rep.bench_figure(report), os.path.join(out, "bench"))
    log(text)
    log(f"wrote {out}/bench.json, bench.txt, bench.png, bench.svg")
    if not agree["ok"]:
        print("error: variants disagree: " + "; ".join(agree["failures"]), file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None, extra_variants: dict | None = None) -> int:
    """scripts/bench.py: exit 0 when every variant agrees, 1 when one does not, 2 on bad
    usage (one line `error: ...` on stderr)."""
    return options.main(build_parser(), lambda args: run(args, extra_variants, log=_log), argv)


def _log(text: str) -> None:
    print(text, flush=True)
