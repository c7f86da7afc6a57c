"""Runs a data-parallel run against its one-device run through the driver, in a process of
its own (JAX's device count is fixed when it starts: tests/test_devices.py starts this with
XLA_FLAGS giving it several CPU devices). Prints one JSON line: per case, the largest gaps
in loss history, weights and variance, and whether a resumed run matched bit for bit.

    python tests/data_parallel_runs.py jax 4
    torchrun --standalone --nproc-per-node 2 tests/data_parallel_runs.py torch 2

(every torch process runs every case; process 0 prints)
"""

import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hetapps import registry  # noqa: E402
from hetcore import checkpoint, criteria, data, driver  # noqa: E402
from hetcore.settings import Settings  # noqa: E402

# Each case splits unevenly over 3 and 4 devices: 203 points; batches of 37 (the last 18).
CASES = {
    "full-batch sgd nll": dict(),
    "adam batches of 37": dict(optimizer="adam", lr=0.003, batch_size=37),
    "beta-nll batches of 50, momentum": dict(loss="beta-nll", batch_size=50, momentum=0.9),
    "mse adamw cosine batches of 64": dict(loss="mse", optimizer="adamw", batch_size=64,
                                           schedule="cosine", warmup_steps=5),
}


def run(framework, devices, epochs=30, resume=None, path=None, dtype="float64", nudge=None,
        **extra):
    s = Settings(framework=framework, preset="none", seed=3, n_points=203, width=16,
                 epochs=epochs, dtype=dtype, chunk_epochs=7, devices=devices,
                 checkpoint_every=15 if path else 0, **extra)
    b = registry.backend(framework)
    x, y = data.for_settings(s).columns(s.dtype)
    w, _ = driver.initial_weights(s, b)
    if nudge is not None:  # a one-ulp twin (hetcore.criteria.ulp_perturb)
        w = criteria.ulp_perturb(w, seed=nudge)
    return driver.train(b, s, x, y, w, resume=resume, checkpoint_path=path)


def gaps(a, b):
    if a.member_losses is not None:  # an ensemble: every member's own losses
        a.loss_history, b.loss_history = a.member_losses, b.member_losses
    return {"loss": float(np.abs(a.loss_history - b.loss_history).max()),
            "weights": max(float(np.abs(a.weights[k] - b.weights[k]).max()) for k in a.weights),
            "var": float(np.abs(a.var - b.var).max())}


def main():
    framework, devices = sys.argv[1], int(sys.argv[2])
    report = {}
    for name, extra in CASES.items():
        report[name] = gaps(run(framework, 1, **extra), run(framework, devices, **extra))
    # An ensemble: its members spread over the devices, against the ensemble on one.
    ensemble = dict(CASES["adam batches of 37"], ensemble=2 * devices)
    report["ensemble"] = gaps(run(framework, 1, **ensemble), run(framework, devices, **ensemble))
    # float32: N devices against one within the one-ulp floor (the gap between one-device
    # runs whose initial weights differ by one ulp), as the frameworks are judged.
    extra = CASES["adam batches of 37"]
    base, par = (run(framework, n, dtype="float32", **extra) for n in (1, devices))
    twins = [run(framework, 1, dtype="float32", nudge=k, **extra) for k in range(2)]
    labels = ("1 device", f"{devices} devices")
    check, _ = criteria.floor_check("loss per epoch", base.loss_history, par.loss_history,
                                    [criteria.gap(base.loss_history, t.loss_history)
                                     for t in twins], "float32", labels)
    checks = [check] + [criteria.final_floor_check(
        f"final {k}", base.weights[k], par.weights[k],
        [(base.weights[k], t.weights[k]) for t in twins], "float32", labels)
        for k in base.weights]
    checks.append(criteria.final_floor_check("final var", base.var, par.var,
                                             [(base.var, t.var) for t in twins], "float32",
                                             labels))
    report["float32"] = {"failures": [c.message() for c in checks if not c.ok],
                         "loss_gap": check.max_abs}
    # Resume on the mesh: 30 epochs with a checkpoint, continued to 60 (constant schedule:
    # the same as 60 straight), against 60 straight; one model and an ensemble.
    for name, extra in (("resume", CASES["adam batches of 37"]), ("resume ensemble", ensemble)):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "ckpt.safetensors")
            run(framework, devices, 30, path=path, **extra)
            resumed = run(framework, devices, 60, resume=checkpoint.load(path), **extra)
        straight = run(framework, devices, 60, **extra)
        report[name] = {"bitwise": bool(
            np.array_equal(resumed.loss_history, straight.loss_history)
            and all(np.array_equal(resumed.weights[k], straight.weights[k])
                    for k in straight.weights)), "device": straight.device}
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(report), flush=True)
    if framework == "torch":  # leave the process group: exiting inside it aborts in C++
        registry.backend("torch").leave()
        # and end at once, as hetapps.launch.finish ends a worker: the interpreter's
        # ordinary exit after that still aborted now and then (SIGABRT, "terminate called
        # without an active exception")
        sys.stdout.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
