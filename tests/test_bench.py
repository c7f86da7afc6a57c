"""scripts/bench.py on tiny workloads: the report's keys, the agreement check that fails a
fast wrong variant, bad options, and the sweep. Speeds are measured, never asserted."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from hetapps.bench import command, memory, references, sweep, timing, variants
from hetapps.bench import report as rep
from tests.conftest import ROOT

TINY = ["--preset", "none", "--n-points", "40", "--width", "8", "--epochs", "12",
        "--chunk-epochs", "5", "--repeats", "5", "--peak-size", "64"]


def _run(tmp_path, *extra, extra_variants=None):
    out = tmp_path / "bench"
    code = command.main([*TINY, "--out", str(out), *extra], extra_variants=extra_variants)
    return code, out


@pytest.mark.slow
def test_bench_writes_the_documented_report(tmp_path, capsys):
    code, out = _run(tmp_path, "--variants", "jax:scan,torch:eager,torch:optim")
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "bench.json").read_text())
    for key in ("device", "threads", "precision", "workload", "flops_per_epoch", "flops_source",
                "references", "variants", "agreement", "fastest", "versions", "repeats"):
        assert key in report, key
    refs = report["references"]
    assert refs["peak"]["best"]["gflops"] > 0 and refs["floor"]["best"]["ms"] > 0
    assert refs["floor"]["matmul_flops"] == references.matmul_flops(40, 8, 2)
    after = refs["peak_after"]
    assert after["library"] == refs["peak"]["best"]["library"] and after["gflops"] > 0
    assert after["drift"] == pytest.approx(after["gflops"] / refs["peak"]["best"]["gflops"] - 1)
    if sys.platform.startswith("linux"):
        assert report["host_malloc"].startswith("glibc, freed blocks kept")
    names = [v["name"] for v in report["variants"]]
    assert names == ["jax:scan", "torch:eager", "torch:optim"]
    from hetcore.hostmem import ResidentPeak

    with ResidentPeak() as probe:  # None where the kernel has no resettable high-water mark
        pass
    measurable = probe.bytes is not None
    for v in report["variants"]:
        m = v["ms_per_epoch"]
        assert len(m["all"]) == 5 and m["min"] <= m["median"] <= m["max"], v["name"]
        for key in ("compile_s", "gflops", "fraction_of_peak", "floor_over_time", "final_loss",
                    "peak_bytes", "activation_bytes", "run_s", "check"):
            assert key in v, (v["name"], key)
        if v["framework"] == "torch" and measurable:
            assert v["peak_memory_method"].startswith("measured: the process's resident peak")
        assert v["check"]["float32_max_gap"] <= rep.CHECK_ATOL
        assert "float64_final_loss" in v["check"]
    assert report["agreement"]["ok"] and report["agreement"]["failures"] == []
    assert set(report["fastest"]) == {"jax", "torch"}
    for name in ("bench.txt", "bench.png", "bench.svg"):
        assert (out / name).stat().st_size > 0
    assert "agreement: ok" in (out / "bench.txt").read_text()


@pytest.mark.slow
def test_unroll_list_times_scan_at_each(tmp_path, capsys):
    from jaxhet import engine

    engine._compiled.clear()
    code, out = _run(tmp_path, "--variants", "jax:scan,jax:step", "--unroll", "1,3",
                     "--check", "float32")
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "bench.json").read_text())
    assert [v["name"] for v in report["variants"]] == ["jax:scan", "jax:scan+unroll3", "jax:step"]
    # each scan variant ran (and its memory was planned) with its own unroll
    assert {k[4] for k in engine._compiled if k[0] == "scan"} == {1, 3}  # key: make_runner
    assert report["agreement"]["ok"]


def _broken(scale):
    """A torch variant that is wrong in a way speed would not show: a scaled learning rate."""

    def trial(w, x, y, settings):
        fw = variants.Framework.load("torch", "cpu")
        return variants.trial(fw, "optim")(w, x, y, settings.replace(lr=settings.lr * scale))

    return trial


@pytest.mark.slow
def test_a_fast_wrong_variant_fails_the_benchmark(tmp_path, capsys):
    code, out = _run(tmp_path, "--variants", "jax:scan,torch:eager",
                     extra_variants={"broken": _broken(1.5)})
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: variants disagree") and "broken" in err
    report = json.loads((out / "bench.json").read_text())
    assert not report["agreement"]["ok"]
    assert all("broken" in f for f in report["agreement"]["failures"])


@pytest.mark.slow
def test_a_wrong_variant_fails_a_mini_batch_adam_workload(tmp_path, capsys):
    """Off the lecture's law rounding grows a thousandfold an epoch, so only the first
    epochs are compared (float64: two); a 1% wrong learning rate still fails there, and the
    right variants pass."""
    adam = ["--batch-size", "16", "--optimizer", "adam", "--epochs", "20"]
    code, out = _run(tmp_path, "--variants", "jax:scan,torch:optim", *adam,
                     extra_variants={"broken": _broken(1.01)})
    assert code == 1
    report = json.loads((out / "bench.json").read_text())
    failures = report["agreement"]["failures"]
    assert failures and all("broken" in f and "first 2 epochs" in f for f in failures), failures
    assert report["agreement"]["float32_epochs"] == 1
    assert report["variants"][1]["check"]["float64_early_gap"] < 1e-12


@pytest.mark.slow
def test_the_same_variant_injected_agrees(tmp_path):
    # The check is not simply "anything injected fails".
    code, _ = _run(tmp_path, "--variants", "torch:eager", "--check", "float32",
                   extra_variants={"same": _broken(1.0)})
    assert code == 0


def test_a_benchmark_where_nothing_ran_reports_why_and_exits_1(tmp_path, capsys,
                                                                monkeypatch):
    """Every variant failing is a report (each variant's error in the table and the JSON)
    and exit 1, not a traceback from the report's writer."""

    def failing(w, x, y, settings):
        raise RuntimeError("no kernel for this")

    monkeypatch.setattr(variants, "trial", lambda *args, **kwargs: failing)
    code, out = _run(tmp_path, "--variants", "torch:eager", "--check", "float32",
                     "--repeats", "1", extra_variants={"failing": failing})
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: variants disagree") and "no variant ran" in err
    report = json.loads((out / "bench.json").read_text())
    assert not report["agreement"]["ok"]
    assert report["agreement"]["failures"][1:] == [
        f"{name}: did not run (RuntimeError: no kernel for this)"
        for name in ("torch:eager", "failing")]
    table = (out / "bench.txt").read_text()
    assert "torch:eager              failed: RuntimeError: no kernel for this" in table
    assert "agreement: FAILED" in table


@pytest.mark.slow
def test_an_ensemble_is_timed_against_its_single_runs(tmp_path, capsys):
    """Each framework's ensemble program and K single runs train the same members (the
    agreement check), set against the ensemble's own floor (its products batched over the
    members) and each other."""
    code, out = _run(tmp_path, "--ensemble", "3", "--batch-size", "16", "--optimizer",
                     "adam")
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "bench.json").read_text())
    names = [r["name"] for r in report["variants"]]
    assert names == list(variants.ENSEMBLE_VARIANTS)
    assert report["agreement"]["ok"], report["agreement"]["failures"]
    floor = report["references"]["floor"]
    assert (floor["members"], floor["batch"]) == (3, 16)
    assert floor["matmul_flops"] == 3 * references.matmul_flops(40, 8, 2)
    assert set(report["ensemble_speedup_over_singles"]) == {"jax", "torch"}
    assert "single runs: jax" in (out / "bench.txt").read_text()


def test_a_workload_floor_times_its_own_shapes():
    from jaxhet import measure as jm
    from torchhet import measure as tm

    for m in (jm, tm):
        for batch, members in ((None, 1), (16, 1), (16, 3), (None, 4)):
            t = m.floor_seconds(50, 8, 2, "float32", "cpu", 2, batch, members)
            assert len(t) == 2 and all(v > 0 for v in t), (m.__name__, batch, members)


@pytest.mark.parametrize("argv,needle", [
    (["--variants", "jax:nope"], "--variants jax:nope"),
    (["--variants", "torch:cudagraph", "--device", "cpu"], "CUDA"),
    (["--repeats", "0"], "--repeats"),
    (["--unroll", "1,0"], "--unroll"),
    (["--device", "tpu"], "--device"),
    (["--sweep", "--points", "10,x"], "--points"),
    (["--no-such-option"], "unrecognized"),
    (["--epochs", "many"], "--epochs"),
    (["--recipe", "calibrated", "--warmup-steps", "100"],
     "--warmup-steps 100: longer than the run's 12 updates"),
    (["--ensemble", "3", "--variants", "jax:scan"], "an ensemble's variants are"),
    (["--variants", "jax:singles"], "give --ensemble K"),
    (["--ensemble", "3", "--variants", "torch:ensemble-map"], "torch's ensemble variants are"),
    (["--ensemble", "3", "--variants", "jax:ensemble-compile"], "jax's ensemble variants are"),
    (["--devices", "2"], "unrecognized arguments: --devices"),
])
def test_bad_options_exit_2_with_one_line(argv, needle, tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "bench.py"), *TINY, *argv,
         "--out", str(tmp_path / "b")],
        capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "WARNING" not in ln]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines


@pytest.mark.slow
def test_sweep_on_a_tiny_grid(tmp_path, capsys):
    out = tmp_path / "sweep"
    # 5e8 points: skipped by the time or the memory estimate on any machine.
    code = command.main(["--sweep", "--points", "30,60,500000000", "--widths", "4", "--repeats", "2",
                       "--variants", "jax:scan,torch:eager", "--remat", "--peak-size", "64",
                       "--max-epoch-s", "0.05", "--repeat-seconds", "0.01",
                       "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "sweep.json").read_text())
    assert report["complete"] is True
    rows = report["rows"]
    timed = [r for r in rows if "ms_per_epoch" in r]
    assert {(r["n_points"], r["width"]) for r in timed} == {(30, 4), (60, 4)}
    assert {r["name"] for r in timed} == {"jax:scan", "jax:scan+remat", "torch:eager",
                                          "torch:eager+remat"}
    assert all("skipped" in r for r in rows if r["n_points"] == 500000000)
    for r in timed:
        assert r["peak_bytes"] > 0 and r["activation_bytes"] >= 0 and r["fraction_of_peak"] > 0
    largest = {(r["name"], r["width"]): r for r in report["largest"]}
    # XLA's plan grows with N; torch's CPU peak is measured in pages, which at 30 and 60
    # points need not grow (then there is no line to follow, and no entry).
    for name in ("jax:scan", "jax:scan+remat", "torch:eager", "torch:eager+remat"):
        peaks = [r["peak_bytes"] for r in sorted(timed, key=lambda r: r["n_points"])
                 if r["name"] == name]
        assert ((name, 4) in largest) == (peaks[1] > peaks[0]), (name, peaks)
    assert ("jax:scan", 4) in largest
    for r in largest.values():
        assert r["bytes_per_point"] > 0
        assert r["largest_n_points"] * r["bytes_per_point"] + r["fixed_bytes"] <= 24 * 2**30
    assert (out / "sweep.png").stat().st_size > 0


def test_a_sweep_cut_short_keeps_its_points(tmp_path, monkeypatch, capsys):
    # The second timed point fails hard (as a kill by a time limit would end the run):
    # sweep.json on disk still holds the first point, marked incomplete.
    real = sweep.time_variants
    calls = []

    def dies_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep, "time_variants", dies_on_second)
    out = tmp_path / "sweep"
    with pytest.raises(KeyboardInterrupt):
        command.main(["--sweep", "--points", "30,60", "--widths", "4", "--repeats", "2",
                    "--variants", "jax:scan", "--peak-size", "64", "--repeat-seconds", "0.01",
                    "--out", str(out)])
    report = json.loads((out / "sweep.json").read_text())
    assert report["complete"] is False
    assert [(r["n_points"], r["name"]) for r in report["rows"]] == [(30, "jax:scan")]
    assert "ms_per_epoch" in report["rows"][0] and "references" in report
    assert not list(out.glob("*.part"))


def test_largest_points_is_the_line_through_the_peaks():
    rows = [{"name": "v", "width": 4, "n_points": n, "peak_bytes": 1000 + 10 * n}
            for n in (10, 20, 40)]
    (r,) = sweep.largest_points(rows, budget=2000)
    assert r["bytes_per_point"] == pytest.approx(10)
    assert r["largest_n_points"] == 100
    assert np.isclose(r["fixed_bytes"], 1000)


def test_a_drifting_peak_is_flagged_in_the_table():
    steady = rep.drift_line({"gflops": 100.0, "drift": 0.05})
    moved = rep.drift_line({"gflops": 70.0, "drift": -0.3})
    assert len(steady) == 1 and "uncertain" not in steady[0] and "+5%" in steady[0]
    assert "-30%" in moved[0] and "uncertain by about 30%" in moved[0]
    assert rep.drift_line(None) == []


@pytest.mark.parametrize("loop,blocks", [("eager", 2), ("no-autograd", 1)])
def test_torch_cpu_memory_estimate_where_nothing_can_be_measured(loop, blocks, monkeypatch):
    # Without a resettable high-water mark the peak is counted: parameters, gradients,
    # data, the loop's saved activations, and its gradient blocks (no-autograd writes all
    # but one over spent activations).
    class Unmeasurable:
        bytes = None

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(memory.hostmem, "ResidentPeak", Unmeasurable)
    n, width = 50, 8
    x, y, w, _ = references.synthetic_workload(n, width, 2)
    v = variants.variant(variants.Framework.load("torch", "cpu"), loop)
    from hetcore.settings import Settings

    out = memory.variant_memory(v, w, x, y, Settings(epochs=3, chunk_epochs=5))
    params = sum(a.size for a in w.values()) * 4
    held = 2 * params + 2 * n * 4 + out["activation_bytes"]
    assert out["peak_bytes"] == held + blocks * n * width * 4
    method = out["peak_memory_method"]
    assert method.startswith("estimate") and f"{blocks} (N, width)" in method


def test_repeats_alternate_between_the_frameworks(monkeypatch):
    # Every round times every variant of both frameworks, so that the machine's drift over
    # a run falls on both alike; the framework changes with a pause, not between variants
    # of one framework.
    calls, pauses = [], []
    monkeypatch.setattr(timing.time, "sleep", lambda s: pauses.append((len(calls), s)))

    def variant(name, fw):
        def trial(*args):
            def repeat():
                calls.append(name)
                return 1.0, np.zeros(3), 0.0

            return 0.0, repeat

        return variants.Variant(name, fw, name, trial)

    vs = [variant("a", "jax"), variant("b", "jax"), variant("c", "torch")]
    from hetcore.settings import Settings

    rows = timing.time_variants(vs, None, None, None, Settings(epochs=3), 3, lambda m: None)
    assert calls == ["a", "b", "c"] * 3
    assert [at for at, _ in pauses] == [2, 3, 5, 6, 8]  # at each change of framework
    assert all(len(r["seconds"]) == 3 for r in rows)


def test_the_tf32_option_is_the_runs_own(monkeypatch, small_state, small_data):
    # The labelled TF32 option sets each framework's matmul precision for its own run
    # only: torch's process-wide setting is back after it (so the peaks measured around it
    # stay true float32), and JAX's layers take Precision.DEFAULT instead of HIGHEST.
    import jax
    import torch
    from flax import nnx

    import jaxhet.backend as jb
    import torchhet.backend as tb
    import torchhet.engine
    from hetcore import driver
    from hetcore.backend import EngineOptions
    from hetcore.settings import Settings

    seen, real = [], torchhet.engine.make_runner

    def make_runner(*args, **kwargs):
        runner = real(*args, **kwargs)
        inner = runner.run

        def recorded(n, losses, start):
            seen.append(torch.get_float32_matmul_precision())
            inner(n, losses, start)

        runner.run = recorded
        return runner

    monkeypatch.setattr(torchhet.engine, "make_runner", make_runner)
    state, (x, y) = small_state(width=4, depth=1), small_data(n=10)
    s = Settings(framework="torch", device="cpu", preset="none", width=4, depth=1, epochs=4,
                 chunk_epochs=2)
    torch.set_float32_matmul_precision("highest")
    tf32 = EngineOptions(matmul_precision="tf32")
    driver.train(tb, s, x, y, state, options=tf32)
    assert seen == ["high", "high"] and torch.get_float32_matmul_precision() == "highest"
    driver.train(tb, s, x, y, state)
    assert seen[2:] == ["highest", "highest"]
    for options, precision in ((tf32, jax.lax.Precision.DEFAULT),
                               (EngineOptions(), jax.lax.Precision.HIGHEST)):
        engine = jb.engine(s.replace(framework="jax", loop="auto"), x, y, state, None, options)
        assert nnx.merge(engine.graphdef, engine.carry[0]).mean_head.precision == precision


@pytest.mark.slow
def test_a_recipe_is_benchmarked_as_the_train_command_runs_it(tmp_path, capsys):
    # The run's training options reach every variant (and its short memory run, whose
    # updates a warm-up of 100 would outlast).
    code, out = _run(tmp_path, "--variants", "jax:scan,torch:optim", "--check", "float32",
                     "--recipe", "calibrated", "--batch-size", "16", "--warmup-steps", "5")
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "bench.json").read_text())
    s = report["workload"]["settings"]
    assert (s["recipe"], s["optimizer"], s["batch_size"], s["epochs"]) == (
        "calibrated", "adamw", 16, 12)
    assert report["agreement"]["ok"]
    assert all(v["peak_bytes"] for v in report["variants"])


@pytest.mark.slow
def test_the_data_parallel_workload_times_the_train_command(tmp_path, capsys):
    """The train command at 1 and 2 devices (JAX host devices, torch processes), each held
    to its framework's one-device run; a count the train command refuses (torch: more
    processes than cores) is skipped with its line, not failed."""
    cores = os.cpu_count() or 1
    code, out = _run(tmp_path, "--data-parallel", f"1,2,{cores + 1}", "--variants",
                     "jax:scan,torch:optim", "--repeats", "1", "--epochs", "4")
    report = json.loads((out / "bench.json").read_text())
    assert code == 0, (capsys.readouterr().err, [v.get("error") for v in report["variants"]])
    names = [v["name"] for v in report["variants"]]
    assert names == ["jax:devices=1", "jax:devices=2", f"jax:devices={cores + 1}",
                     "torch:devices=1", "torch:devices=2"]
    dp = report["data_parallel"]
    assert dp["skipped"] == [f"torch:devices={cores + 1}: --devices {cores + 1}: torch runs "
                             f"one process a device, and this machine has {cores} CPU cores"]
    assert set(dp["speedup_over_one_device"]) == {"jax", "torch"}
    for v in report["variants"]:
        assert set(v["wall_s"]) == {"4", "8"} and v["check"]["float32_max_gap"] <= rep.CHECK_ATOL
        assert "floor_over_time" in v
    assert report["agreement"]["ok"]


def test_the_data_parallel_workload_refuses_bad_counts(capsys):
    for counts, why in (("2,4", "needs 1"), ("1,0", "positive"), ("1,99999", "at most")):
        assert command.main([*TINY, "--data-parallel", counts]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --data-parallel") and why in err, err
        assert err.count("\n") == 1
