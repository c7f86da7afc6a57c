"""The report: the agreement check that fails a fast wrong variant, the rates against the
references, the table, the JSON and the figure."""

from __future__ import annotations

import math

import numpy as np

CHECK_ATOL = 1e-4  # float32 loss agreement over the first epochs (rounding there: ~1e-7)
CHECK_EPOCHS = 100  # before the lecture's SGD turns chaotic (docs/numerics.md)
F64_RTOL = 1e-6  # float64 final losses (the frameworks agree to ~3e-7 over the lecture run)
# A workload off the lecture's law: float32 compares its initial loss (a wrong forward),
# float64 that and epoch 1's, after a whole epoch of updates (a wrong update). Rounding
# grows about a thousandfold in that first epoch (measured, 80 Adam updates: float64 6e-14,
# float32 1.3e-4), so float32 cannot judge the updates there and float64 can.
UNSTABLE_EPOCHS = {"float32": 1, "float64": 2}
# ... and float32's epoch-0 loss there is the mean over that epoch's batches, 79 of them
# after an update: two right loops parted by 1.3e-4 (torch's fused Adam against optax's)
# and 3.4e-4 (torch's foreach Adam, compiled, against optax's) on 20,000 points in batches
# of 250, so it is held to 1e-3, which still catches a wrong forward pass or loss; a wrong
# update fails the float64 check (a 1% wrong learning rate: tests/test_bench.py).
UNSTABLE_F32_ATOL = 1e-3
F64_EARLY_RTOL = 1e-9  # float64 losses there (rounding: ~1e-13; a wrong update: >1e-4)
DRIFT_WARN = 0.10  # peak before and after the variants further apart: flagged in the table


def agreement(rows: list[dict], check_epochs: int, f64: dict | None,
              stable: bool = True) -> dict:
    """Whether every variant trained the same run as the first one. stable: the workload
    is the lecture's law (full-batch plain SGD), whose runs stay together; otherwise
    (mini-batches, momentum, Adam) two runs that differ only in rounding part a
    thousandfold in the first epoch and about tenfold an epoch after (measured: 20,000
    points, batches of 250, Adam, float64 gaps 6e-14 at epoch 1 and 1.4e-7 at epoch 9), so
    only the first epochs are compared (UNSTABLE_EPOCHS), where a wrong
    variant already shows (its first update is wrong) and rounding does not."""
    ok_rows = [r for r in rows if "history" in r]
    if not ok_rows:
        return {"ok": False, "reference": None, "failures": ["no variant ran"] + [
            f"{r['name']}: did not run ({r['error']})" for r in rows if "error" in r]}
    ref = ok_rows[0]
    failures = []
    k = min(check_epochs if stable else UNSTABLE_EPOCHS["float32"], len(ref["history"]))
    k64 = UNSTABLE_EPOCHS["float64"]
    atol = CHECK_ATOL if stable else UNSTABLE_F32_ATOL
    for r in rows:
        if "error" in r:
            failures.append(f"{r['name']}: did not run ({r['error']})")
            continue
        gap = float(np.max(np.abs(np.asarray(r["history"][:k], np.float64)
                                  - np.asarray(ref["history"][:k], np.float64))))
        r["check"] = {"float32_epochs": k, "float32_max_gap": gap}
        if not math.isfinite(r["final_loss"]) or not gap <= atol:
            failures.append(f"{r['name']}: float32 losses of the first {k} epochs differ from "
                            f"{ref['name']}'s by up to {gap:.3g} (allowed {atol:g})")
        if f64 is None or r["name"] not in f64:
            continue
        final, history = f64[r["name"]]
        r["check"]["float64_final_loss"] = final
        r0 = f64.get(ref["name"])
        if r0 is None:
            failures.append(f"{r['name']}: no float64 run of {ref['name']} to compare with")
        elif stable and not abs(final - r0[0]) <= F64_RTOL * max(1.0, abs(r0[0])):
            failures.append(f"{r['name']}: float64 final loss {final!r} differs "
                            f"from {ref['name']}'s {r0[0]!r} (allowed rtol {F64_RTOL:g})")
        elif not stable:
            gap64 = float(np.max(np.abs(history[:k64] - r0[1][:k64])))
            r["check"]["float64_early_gap"] = gap64
            if not gap64 <= F64_EARLY_RTOL * max(1.0, float(np.max(np.abs(r0[1][:k64])))):
                failures.append(f"{r['name']}: float64 losses of the first {k64} epochs differ "
                                f"from {ref['name']}'s by up to {gap64:.3g} (allowed rtol "
                                f"{F64_EARLY_RTOL:g})")
    return {"ok": not failures, "reference": ref["name"], "float32_epochs": k,
            "float32_atol": atol, "float64_rtol": F64_RTOL if f64 is not None else None,
            "float64": None if f64 is None else
            (f"final losses within rtol {F64_RTOL:g}" if stable else
             f"losses of the first {k64} epochs within rtol "
             f"{F64_EARLY_RTOL:g}"),
            "failures": failures}


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
        # against its own library's products (XLA's for JAX, torch's for torch): what the
        # loop leaves on the table, apart from how fast the library multiplies
        own = refs["floor"].get(r["framework"])
        if isinstance(own, dict) and "ms" in own:
            r["own_floor_over_time"] = own["ms"] / med


def table(report: dict) -> str:
    refs = report["references"]
    pk, fl = refs["peak"], refs["floor"]
    others = ", ".join(f"{k} {v['gflops']:.1f}" for k, v in pk.items() if k not in ("size", "best"))
    floors = ", ".join(f"{k} {v['ms']:.3f}" for k, v in fl.items()
                       if k != "best" and isinstance(v, dict))  # each library's
    w = report["workload"]
    load = report.get("machine_load", {})
    lines = [
        f"device: {report['device']['name']} | threads {report['threads']} | "
        f"precision {report['precision']} | load average {load.get('start')} -> "
        f"{load.get('end')}",
        f"workload: N={w['n_points']} width={w['width']} depth={w['depth']} "
        f"epochs={w['epochs']} chunk={w['chunk_epochs']} | "
        f"{report['flops_per_epoch'] / 1e6:.1f} MFLOP/epoch ({report['flops_source']})",
        f"f32 matmul peak ({pk['size']}^3): {pk['best']['gflops']:.1f} GFLOP/s "
        f"({pk['best']['library']}; {others}) | matmul floor: {fl['best']['ms']:.3f} ms/epoch "
        f"({fl['best']['library']}; {floors})",
        *drift_line(refs.get("peak_after")),
        "",
        f"{'variant':24s} {'compile s':>9s} {'ms/epoch median [min, max]':>28s} {'GFLOP/s':>8s} "
        f"{'% peak':>7s} {'floor/t':>7s} {'own/t':>7s} {'peak MiB':>9s} {'act MiB':>8s} "
        f"{'final loss':>11s} {'run s':>7s}",
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
            f"{100 * r.get('own_floor_over_time', float('nan')):6.1f}% "
            f"{(mem / 2**20 if mem else float('nan')):9.2f} "
            f"{(act / 2**20 if act is not None else float('nan')):8.2f} "
            f"{r['final_loss']:11.6f} {r['run_s']:7.2f}")
    a = report["agreement"]
    lines.append("")
    if a.get("reference") is None:  # nothing ran to compare
        lines.append("agreement: FAILED")
    else:
        lines.append("agreement: " + ("ok" if a["ok"] else "FAILED") +
                     f" (float32 first {a['float32_epochs']} epochs within "
                     f"{a['float32_atol']:g} of {a['reference']}"
                     + (f"; float64 {a['float64']}" if a.get("float64") else "") + ")")
    lines += [f"  {f}" for f in a["failures"]]
    speedup = report.get("ensemble_speedup_over_singles")
    if speedup:
        k = report["workload"]["settings"]["ensemble"]
        lines.append(f"the ensemble's one program (its fastest way) against {k} single runs: "
                     + ", ".join(f"{fw} {v:.2f}x" for fw, v in speedup.items())
                     + " (their time over its)")
    best = report.get("fastest", {})
    if best:
        lines.append("fastest run, compile included: " + ", ".join(
            f"{k} {v['name']} ({v['run_s']:.2f} s)" for k, v in best.items()))
    return "\n".join(lines)


def drift_line(after: dict | None) -> list[str]:
    if not after:
        return []
    line = (f"peak again after the variants: {after['gflops']:.1f} GFLOP/s "
            f"({100 * after['drift']:+.0f}%)")
    if abs(after["drift"]) > DRIFT_WARN:
        line += (" - the machine's speed moved while the variants ran: read every % of "
                 f"peak as uncertain by about {100 * abs(after['drift']):.0f}%")
    return [line]


def bench_figure(report: dict):
    from hetcore.figures import plt  # matplotlib, only once there is a figure to draw

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
