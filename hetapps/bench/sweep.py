"""The sweep (`--sweep`): points x widths, time per epoch and memory against FLOPs per
epoch, with and without rematerialisation, and the largest point count that fits a memory
budget."""

from __future__ import annotations

import gc

import numpy as np

from hetapps.bench.memory import variant_memory
from hetapps.bench.references import matmul_flops, synthetic_workload
from hetapps.bench.timing import short, time_variants
from hetapps.bench.variants import Variant
from hetcore.settings import Settings

GIB = 1024 ** 3


def sweep(fws: dict, variants: list[Variant], points: list[int], widths: list[int], depth: int,
          repeats: int, peak_gflops: float, max_epoch_s: float, memory_limit: float,
          budget_bytes: float, log, repeat_s: float = 0.2, on_row=None, settle=None) -> dict:
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
            x, y, w, _ = synthetic_workload(n, width, depth)
            log(f"sweep N={n} width={width}: {epochs} epochs x {repeats}")
            for v in variants:
                row = {"n_points": n, "width": width, "name": v.name, "framework": v.framework,
                       "loop": v.loop, "remat": v.remat, "epochs": epochs,
                       "matmul_flops": flops}
                try:
                    run = Settings(preset="none", n_points=n, width=width, depth=depth,
                                   lr=1e-4, epochs=epochs, chunk_epochs=epochs)
                    timed = time_variants([v], w, x, y, run, repeats, lambda s: None,
                                          settle)[0]
                    if "error" in timed:
                        row["error"] = timed["error"]
                    else:
                        row["compile_s"] = timed["compile_s"]
                        row["ms_per_epoch"] = timed["ms_per_epoch"]
                        row["gflops"] = flops / (timed["ms_per_epoch"]["median"] * 1e-3) / 1e9
                        row["fraction_of_peak"] = row["gflops"] / peak_gflops
                        row.update(variant_memory(v, w, x, y, run))
                except Exception as e:  # noqa: BLE001 - out of memory and the like
                    row["error"] = short(e)
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
    for fw in fws.values():
        fw.measure.release(fw.device)


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
    from hetcore.figures import plt  # matplotlib, only once there is a figure to draw

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
    if rows:  # a sweep whose every point was skipped has nothing to label
        axes[0].legend(fontsize=7)
    else:
        axes[0].text(0.5, 0.5, "no point ran: sweep.json says why", ha="center",
                     transform=axes[0].transAxes)
    fig.tight_layout()
    return fig
