"""Each variant's memory: what its backward pass keeps (activations) and what it holds at
its peak, by the best means the framework offers: the compiled program's buffer plan
(XLA), the device allocator's peak over a short run (CUDA), or the process's resident peak
over a short run (a CPU, where torch keeps no allocator statistics)."""

from __future__ import annotations

import gc

from hetapps.bench.variants import Variant, run_settings
from hetcore import driver, hostmem

SHORT_EPOCHS = 3  # a run long enough to reach its steady state, short enough for a sweep


def variant_memory(v: Variant, w, x, y, base) -> dict:
    """peak_bytes, peak_memory_method and activation_bytes of variant `v` on this workload
    (the run `base`, a Settings, says)."""
    fw = v.fw
    settings = run_settings(fw, v.loop, base, w, x, v.remat)
    act = fw.measure.activation_bytes(settings, x, y, w)
    out = {"activation_bytes": act}
    plan = fw.measure.program_memory(settings, x, y, w, v.options)
    if plan is not None:
        return {**out, "peak_bytes": plan.get("peak"), "buffer_plan": plan,
                "peak_memory_method": "the compiled program's buffer plan (arguments + "
                "outputs + temporaries - donated)"}
    # memory does not depend on the schedule: no warm-up, which 3 epochs may not outlast
    short = settings.replace(epochs=min(settings.epochs, SHORT_EPOCHS), warmup_steps=0)

    def short_run():
        driver.train(fw.backend, short, x, y, w, options=v.options)

    gc.collect()
    fw.measure.release(fw.device)
    fw.measure.reset_peak(fw.device)
    short_run()  # also the process's one-time set-up (thread pools, BLAS buffers), before below
    peak = fw.measure.peak_bytes(fw.device)
    if peak is not None:
        return {**out, "peak_bytes": peak, "peak_memory_method":
                f"the device allocator's peak over a {short.epochs}-epoch run"}
    item, n = x.dtype.itemsize, x.shape[0]
    width = w["layers.0.weight"].shape[0]
    params = sum(a.nbytes for a in w.values())
    held = 2 * params + 2 * n * item + act  # what an epoch cannot do without
    peaks = []
    for _ in range(2):  # the same run peaks one (N, width) block apart at times
        with hostmem.ResidentPeak() as measured:
            short_run()
        peaks.append(measured.bytes)
    if None not in peaks:
        # Pages, not tensors: a tiny run fits in pages the process already has, so the
        # measurement is never taken below what must be held.
        return {**out, "peak_bytes": max(*peaks, held), "resident_peaks": peaks,
                "peak_memory_method": (
                    "measured: the process's resident peak above its resident set before the "
                    f"run, the higher of two {short.epochs}-epoch runs, freed blocks handed "
                    "back as they are freed (no allocator statistics on this device); at "
                    "least parameters + gradients + data + saved activations")}
    # No resettable high-water mark here: count what the epoch must hold. no-autograd
    # writes each gradient over a spent activation but one (torchhet/handgrad.py).
    blocks = 1 if v.loop == "no-autograd" else 2
    return {**out, "peak_bytes": held + blocks * n * width * item,
            "peak_memory_method": ("estimate: parameters + gradients + data + saved "
                                   f"activations + {blocks} (N, width) gradient buffers")}
