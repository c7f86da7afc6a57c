"""The workload and the references every speed is set against, measured in the same run on
the same device and threads: each library's float32 matmul peak (a large square product;
the faster library is the device's peak) and matmul floor (one epoch's own products back to
back, nothing else: no loop can beat it)."""

from __future__ import annotations

import statistics

from hetcore import data, interchange
from hetcore.settings import Settings


def workload(settings: Settings):
    """(x, y, weights, description) for the benchmark, float32: the settings' data, and the
    lecture's weights or weights drawn by numpy (the same for every variant, neither
    framework's initialiser)."""
    ds = data.for_settings(settings)
    x, y = ds.columns("float32")
    if settings.ensemble > 1:  # member k from seed + k
        k, seed = settings.ensemble, settings.init_seed
        w = interchange.stack([interchange.draw_initial(settings.width, settings.depth,
                                                        "float32", seed + i) for i in range(k)])
        src = f"numpy init(seed={seed}..{seed + k - 1})"
    elif settings.lecture_weights:
        w, src = interchange.cast(interchange.lecture_weights(), "float32"), "lecture"
    else:
        w = interchange.draw_initial(settings.width, settings.depth, "float32",
                                     settings.init_seed)
        src = f"numpy init(seed={settings.init_seed})"
    return x, y, w, {"data": ds.source, "weights": src}


def synthetic_workload(n: int, width: int, depth: int, seed: int = 0):
    """workload() of a synthetic draw of n points and a numpy-drawn model."""
    return workload(Settings(preset="none", seed=seed, n_points=n, width=width, depth=depth))


def matmul_flops(n: int, width: int, depth: int) -> int:
    """FLOPs of one epoch's matrix products (forward, weight and input gradients)."""
    fwd = 2 * n * width + 2 * n * width * width * (depth - 1) + 2 * 2 * n * width
    wgrad = fwd
    igrad = 2 * n * width * width * (depth - 1) + 2 * 2 * n * width
    return fwd + wgrad + igrad


def references(fws: dict, n: int, width: int, depth: int, size: int, repeats: int,
               settle, batch: int | None = None, members: int = 1) -> dict:
    """Each library's float32 matmul peak and matmul floor; the best of each is the
    device's. The floor is the workload's own: its epoch's updates at their batch shapes
    (`batch`, None for full batches), batched over an ensemble's `members`."""
    peak, floor = {}, {}
    for name, fw in fws.items():
        settle(name)
        t = fw.measure.matmul_seconds(size, "float32", fw.device, repeats)
        peak[name] = {"gflops": 2 * size ** 3 / min(t) / 1e9,
                      "gflops_median": 2 * size ** 3 / statistics.median(t) / 1e9}
        f = fw.measure.floor_seconds(n, width, depth, "float32", fw.device, repeats, batch,
                                     members)
        floor[name] = {"ms": 1e3 * min(f), "ms_median": 1e3 * statistics.median(f)}
    best_peak = max(peak, key=lambda k: peak[k]["gflops"])
    best_floor = min(floor, key=lambda k: floor[k]["ms"])
    return {
        "peak": {"size": size, **peak, "best": {"library": best_peak,
                                                  "gflops": peak[best_peak]["gflops"]}},
        "floor": {**floor, "best": {"library": best_floor, "ms": floor[best_floor]["ms"]},
                  "matmul_flops": members * matmul_flops(n, width, depth),
                  "batch": batch, "members": members},
    }


def peak_again(fws: dict, before: dict, repeats: int, settle) -> dict:
    """The best library's peak measured again after the variants: how far the machine's
    speed drifted while they ran (a shared or throttled machine moves every figure)."""
    lib = before["best"]["library"]
    settle(lib)
    t = fws[lib].measure.matmul_seconds(before["size"], "float32", fws[lib].device, repeats)
    gflops = 2 * before["size"] ** 3 / min(t) / 1e9
    return {"library": lib, "gflops": gflops,
            "drift": gflops / before["best"]["gflops"] - 1}


def epoch_flops(fws: dict, settings: Settings, x, y, w) -> tuple[float, str]:
    """FLOPs per epoch for every variant, and where the figure comes from: a framework's
    compiler where one counts them (XLA's cost analysis of jaxhet's compiled epoch: the
    products and the element-wise work), else the products counted."""
    for fw in fws.values():
        flops = fw.measure.epoch_flops(settings.replace(framework=fw.name, device=fw.device),
                                       x, y, w)
        if flops is not None:
            return flops, f"{fw.name}'s compiler (XLA cost analysis of the compiled epoch)"
    return float(matmul_flops(len(x), settings.width, settings.depth)), \
        "matrix products counted (no compiler counts them here)"
