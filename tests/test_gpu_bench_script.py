"""scripts/gpu_bench.sh rehearsed on the CPU (GPU_BENCH_DEVICE=cpu, GPU_BENCH_QUICK=1): a
GPU is often had for a few minutes at a time, so the script's plumbing (steps, time budget,
the archive rewritten after every step) is proven here, where a mistake costs nothing."""

import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not all(shutil.which(t) for t in ("bash", "tar", "timeout")),
    reason="needs bash, tar and coreutils' timeout")]  # each test runs the whole script (15-90 s)

SCRIPT = os.path.join(ROOT, "scripts", "gpu_bench.sh")


def _run(out, **env):
    full = {**os.environ, "OUT": str(out), "GPU_BENCH_DEVICE": "cpu", "GPU_BENCH_QUICK": "1",
            "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", SCRIPT], env=full, capture_output=True, text=True,
                          timeout=600)


def _names(out):
    with tarfile.open(out / "gpu-bench.tgz") as tar:
        return {m.name.removeprefix("./") for m in tar.getmembers()}


def _read(out, name):
    with tarfile.open(out / "gpu-bench.tgz") as tar:
        return tar.extractfile("./" + name).read().decode()


def test_every_step_lands_in_the_archive(tmp_path):
    out = tmp_path / "gpu"
    proc = _run(out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    names = _names(out)
    for name in ("env.txt", "steps.log", "bench/bench.json", "bench/bench.txt",
                 "minibatch/bench.json", "ensemble/bench.json", "devices/bench.json",
                 "sweep/sweep.json", "parity.log",
                 *(f"train/{fw}-{e}/metrics.json" for fw in ("jax", "torch") for e in (20, 40))):
        assert name in names, name
    assert json.loads(_read(out, "sweep/sweep.json"))["complete"] is True
    for workload in ("bench", "minibatch", "ensemble", "devices"):
        assert json.loads(_read(out, f"{workload}/bench.json"))["agreement"]["ok"], workload
    assert json.loads(_read(out, "devices/bench.json"))["data_parallel"]["counts"] == [1, 2]
    parity = _read(out, "parity.log")
    assert " passed" in parity and "PASSED" in parity and "parity.xml" in parity
    steps = (out / "steps.log").read_text()
    for step in ("bench", "minibatch", "ensemble", "devices", "train-jax-20", "train-jax-40",
                 "train-torch-20", "train-torch-40", "sweep", "parity"):
        assert f"== {step} (at most" in steps, step
    assert steps.count("exit 0 after") == 10 and "skipped" not in steps
    assert (out / "bench.txt").read_text().startswith("device:")
    assert not list(out.glob("*.part"))


def test_a_spent_budget_skips_steps_and_still_archives(tmp_path):
    out = tmp_path / "gpu"
    proc = _run(out, BUDGET_S="0", STEPS="bench sweep")
    assert proc.returncode == 124, proc.stdout + proc.stderr
    steps = (out / "steps.log").read_text()
    assert "== bench: skipped" in steps and "== sweep: skipped" in steps
    names = _names(out)
    assert "steps.log" in names and "env.txt" in names


def test_a_step_over_its_cap_is_stopped_and_named(tmp_path):
    # A 1-second cap cannot fit the benchmark (imports alone take longer): it is killed,
    # the exit status says so, and the steps after it still run.
    out = tmp_path / "gpu"
    proc = _run(out, STEPS="bench nonsense", BENCH_S="1", MIN_STEP_S="0")
    assert proc.returncode == 124, proc.stdout + proc.stderr
    steps = (out / "steps.log").read_text()
    # 124 when the SIGINT stopped it; 137 when Python dropped the interrupt (in one of
    # JAX's gc callbacks, frequent while it imports) and the kill 15 s later did
    assert "(out of time)" in steps
    assert "exit 124 after" in steps or "exit 137 after" in steps
    assert "== nonsense: unknown step" in steps


def test_a_step_that_ignores_sigint_is_killed_and_still_out_of_time(tmp_path):
    # Python drops a KeyboardInterrupt that lands in a gc callback (JAX registers one), so
    # a step may outlive its SIGINT: it is killed 15 s later (exit 137), and that still
    # reads as out of time (exit 124), not as a crash.
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\n[ "$1" = -c ] && exit 0\ntrap "" INT\nsleep 60\n')
    fake.chmod(0o755)
    out = tmp_path / "gpu"
    proc = _run(out, STEPS="bench", BENCH_S="1", MIN_STEP_S="0", PYTHON=str(fake))
    assert proc.returncode == 124, proc.stdout + proc.stderr
    steps = (out / "steps.log").read_text()
    assert "exit 137 after" in steps and "(out of time)" in steps
