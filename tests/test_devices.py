"""--devices N: data-parallel runs against the one-device run (float64 within 1e-10, float32
within the one-ulp floor), in JAX on a mesh of CPU devices and over two processes, in torch
in processes the train command starts and under torchrun; and how a run over several
processes fails: one line, the right exit status, nothing written, no process left."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from hetapps.train import main
from hetcore.errors import UsageError
from hetcore.schedule import shard_bounds
from hetcore.settings import Settings
from tests.conftest import ROOT

TOL = 1e-10  # float64: N devices against one (the sums' order is all that differs)
TRAIN = os.path.join(ROOT, "scripts", "train.py")
HELPER = os.path.join(ROOT, "tests", "data_parallel_runs.py")
# Uneven over 2, 3 and 4: 203 points, batches of 37 (the last 18), Adam.
RUN = ["--preset", "none", "--seed", "5", "--n-points", "203", "--width", "16", "--epochs",
       "30", "--dtype", "float64", "--batch-size", "37", "--optimizer", "adam", "--lr",
       "0.003", "--device", "cpu", "--no-progress"]


def env(**extra):
    e = {**os.environ, "PYTHONPATH": ROOT, **extra}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if k not in extra:
            e.pop(k, None)
    return e


def cpus(n):
    return {"XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}


def command(*argv, extra=None, timeout=300):
    return subprocess.run([sys.executable, *argv], env=env(**(extra or {})), text=True,
                          capture_output=True, timeout=timeout)


def results(out):
    m = json.loads(open(os.path.join(out, "metrics.json")).read())
    return m, load_file(os.path.join(out, "weights.safetensors"))


def assert_same_run(one, many):
    (m1, w1), (mn, wn) = results(one), results(many)
    np.testing.assert_allclose(mn["loss_history"], m1["loss_history"], rtol=0, atol=TOL)
    for k in w1:
        np.testing.assert_allclose(wn[k], w1[k], rtol=0, atol=TOL, err_msg=k)
    p1, pn = (np.loadtxt(os.path.join(d, "predictions.csv"), delimiter=",", skiprows=1)
              for d in (one, many))
    np.testing.assert_allclose(pn, p1, rtol=0, atol=TOL)
    return mn


def test_shares_cover_every_batch_once():
    for batch in (1, 2, 3, 10, 37, 203):
        for devices in (1, 2, 3, 4, 7):
            parts = [shard_bounds(batch, devices, r) for r in range(devices)]
            assert parts[0][0] == 0 and parts[-1][1] == batch
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            assert max(hi - lo for lo, hi in parts) == -(-batch // devices)
    assert [shard_bounds(10, 4, r) for r in range(4)] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert shard_bounds(2, 4, 3) == (2, 2)  # an empty share: the device adds nothing


@pytest.mark.parametrize("kw,message", [
    (dict(devices=0), "--devices: must be at least 1"),
    (dict(devices=True), "--devices: expected an integer"),
    (dict(devices=10**6), "--devices: at most 4096"),
    (dict(devices=2, framework="both"), "train each --framework on its own"),
    (dict(devices=2, ensemble=3), "--ensemble 3 is not a multiple of 2"),
    (dict(devices=2, loop="step"), "--loop step: trains on one device"),
    (dict(devices=2, framework="torch", loop="no-autograd"), "--loop no-autograd"),
])
def test_settings_refuse(kw, message):
    with pytest.raises(UsageError, match=message):
        Settings(**kw)


def test_more_jax_devices_than_present_are_refused(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(RUN + ["--devices", "3", "--out", out]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "--devices 3: jax has 1 cpu device(s): cpu:0 (cpu)" in err
    assert "xla_force_host_platform_device_count" in err
    assert not os.path.exists(out)


def test_torch_environment_refusals(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "run")
    torch_run = RUN + ["--framework", "torch", "--out", out]
    cases = [
        (dict(RANK="2", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500"), [],
         "RANK=2 is not below WORLD_SIZE=2"),
        (dict(RANK="0", WORLD_SIZE="2"), [], "MASTER_ADDR, MASTER_PORT is not"),
        (dict(RANK="0", WORLD_SIZE="two", MASTER_ADDR="h", MASTER_PORT="1"), [],
         "WORLD_SIZE='two' is not an integer"),
        (dict(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500"),
         ["--devices", "3"], "--devices 3: torchrun started WORLD_SIZE=2"),
    ]
    for variables, more, message in cases:
        for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.delenv(k, raising=False)
        for k, v in variables.items():
            monkeypatch.setenv(k, v)
        assert main(torch_run + more) == 2, message
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err, err
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    assert main(torch_run + ["--coordinator", "127.0.0.1:1234"]) == 2
    assert "--coordinator: jax's way" in capsys.readouterr().err
    assert main(RUN + ["--num-processes", "2", "--out", out]) == 2
    assert "need --coordinator" in capsys.readouterr().err
    assert main(RUN + ["--coordinator", "nowhere", "--num-processes", "2", "--process-id",
                       "0", "--out", out]) == 2
    assert "expected HOST:PORT" in capsys.readouterr().err
    # A port in use where the command would start its workers.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        monkeypatch.setenv("MASTER_PORT", str(busy.getsockname()[1]))
        assert main(torch_run + ["--devices", "2"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "cannot listen on it here" in err, err
        monkeypatch.delenv("MASTER_PORT")
        # ... and where jax's process 0 would serve the coordinator
        assert main(RUN + ["--devices", "2", "--coordinator",
                           f"127.0.0.1:{busy.getsockname()[1]}", "--num-processes", "2",
                           "--process-id", "0", "--out", out]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "cannot listen on port" in err, err
    assert not os.path.exists(out)


@pytest.mark.slow
@pytest.mark.parametrize("framework,devices", [("jax", 4), ("torch", 2)])
def test_data_parallel_equals_one_device(framework, devices):
    """Four loss/optimiser/batch cases in float64, an ensemble spread over the devices, a
    float32 run against the one-ulp floor, and resumed runs (one model, an ensemble)
    against the uninterrupted ones, bit for bit."""
    if framework == "jax":
        done = command(HELPER, "jax", str(devices), extra=cpus(devices))
    else:
        done = command("-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                       str(devices), HELPER, "torch", str(devices))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for case, gaps in report.items():
        if case.startswith("resume") or case == "float32":
            continue
        assert max(gaps.values()) <= TOL, (case, gaps)
    assert report["float32"]["failures"] == []
    assert report["resume"]["bitwise"] and report["resume ensemble"]["bitwise"]
    assert f"{devices}" in report["resume"]["device"]


@pytest.mark.slow
def test_train_command_on_four_jax_devices(tmp_path):
    one, four = str(tmp_path / "one"), str(tmp_path / "four")
    for out, more in ((one, []), (four, ["--devices", "4"])):
        done = command(TRAIN, *RUN, *more, "--out", out, extra=cpus(4))
        assert done.returncode == 0, done.stderr[-2000:]
    m = assert_same_run(one, four)
    assert m["config"]["devices"] == 4 and "(4 devices)" in m["device"]


@pytest.mark.slow
def test_torch_processes_started_by_the_command_and_by_torchrun(tmp_path):
    one, ours, theirs = (str(tmp_path / n) for n in ("one", "ours", "torchrun"))
    torch_run = RUN + ["--framework", "torch"]
    for argv in ([TRAIN, *torch_run, "--out", one],
                 [TRAIN, *torch_run, "--devices", "2", "--out", ours],
                 ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                  TRAIN, *torch_run, "--out", theirs]):
        done = command(*argv)
        assert done.returncode == 0, done.stderr[-2000:]
    for many in (ours, theirs):
        m = assert_same_run(one, many)
        assert m["config"]["devices"] == 2 and "process 0 of 2" in m["device"]
    # only process 0 wrote: nothing beside the run directories
    assert sorted(os.listdir(tmp_path)) == ["one", "ours", "torchrun"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_jax_over_two_processes_on_localhost(tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    done = command(TRAIN, *RUN, "--out", one)
    assert done.returncode == 0, done.stderr[-2000:]
    where = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen([sys.executable, TRAIN, *RUN, "--devices", "2", "--coordinator",
                               where, "--num-processes", "2", "--process-id", str(i),
                               "--out", two], env=env(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in (1, 0)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[1][1][-2000:]
    m = assert_same_run(one, two)
    assert "2 processes" in m["device"]
    assert "wrote" in outs[1][0] and "wrote" not in outs[0][0]  # process 0 alone writes


def _children(pid):
    """The processes whose parent is `pid` (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return found


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


LONG = ["--preset", "none", "--n-points", "200", "--width", "16", "--epochs", "1000000",
        "--framework", "torch", "--devices", "2", "--device", "cpu", "--no-progress"]


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the workers through /proc")
def test_a_killed_worker_ends_the_run_with_one_line(tmp_path):
    out = str(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, TRAIN, *LONG, "--out", out], env=env(),
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    workers = []
    while len(workers) < 2 and time.time() < deadline:
        workers = sorted(_children(proc.pid))
        time.sleep(0.1)
    assert len(workers) == 2, "the workers never started"
    time.sleep(6)  # into training (the workers have joined)
    os.kill(workers[1], signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert err.strip() == "error: torch process 1 of 2 was killed by signal 9 (SIGKILL); " \
                          "the run was stopped"
    assert not any(_alive(w) for w in workers)
    assert os.listdir(tmp_path) == []  # no run, no staging directory


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the workers through /proc")
def test_killing_the_command_stops_its_workers(tmp_path):
    proc = subprocess.Popen([sys.executable, TRAIN, *LONG, "--out", str(tmp_path / "run")],
                            env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    workers = []
    while len(workers) < 2 and time.time() < deadline:
        workers = sorted(_children(proc.pid))
        time.sleep(0.1)
    assert len(workers) == 2
    proc.send_signal(signal.SIGKILL)  # no clean-up of its own runs
    proc.wait()
    deadline = time.time() + 30
    while any(_alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers)
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the workers through /proc")
def test_a_lost_jax_process_ends_the_other_with_one_line(tmp_path):
    out = str(tmp_path / "run")
    where = f"127.0.0.1:{_free_port()}"
    argv = ["--preset", "none", "--n-points", "200", "--width", "16", "--epochs", "1000000",
            "--devices", "2", "--coordinator", where, "--num-processes", "2", "--device",
            "cpu", "--no-progress", "--out", out]
    procs = [subprocess.Popen([sys.executable, TRAIN, *argv, "--process-id", str(i)],
                              env=env(), text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for i in (0, 1)]
    deadline = time.time() + 120
    while not all(_children(p.pid) for p in procs) and time.time() < deadline:
        time.sleep(0.1)
    children = [c for p in procs for c in _children(p.pid)]
    time.sleep(8)  # joined and training
    os.kill(_children(procs[1].pid)[0], signal.SIGKILL)  # process 1 itself dies
    outs = [p.communicate(timeout=200) for p in procs]
    assert [p.returncode for p in procs] == [1, 1]
    lines = [err.strip() for _, err in outs]
    assert all(line.count("\n") == 0 for line in lines), lines
    assert lines[0].startswith("error: jax process 0 of 2 failed"), lines[0]
    assert lines[1].startswith("error: jax process 1 of 2 was killed by signal 9"), lines[1]
    log = lines[1].rsplit("its log: ", 1)[1].rstrip(")")
    assert os.path.isfile(log)
    os.remove(log)
    assert not any(_alive(c) for c in children)
    assert os.listdir(tmp_path) == []


def test_more_torch_processes_than_cores_are_refused_before_any_start(tmp_path, capsys):
    out = str(tmp_path / "run")
    n = (os.cpu_count() or 1) + 1
    assert main(RUN + ["--framework", "torch", "--devices", str(n), "--out", out]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: --devices {n}: torch runs one process a device, and this machine "
                   f"has {n - 1} CPU cores")
    assert not os.path.exists(out)


def test_an_ensembles_memory_is_judged_per_device():
    from hetcore.settings import check_memory, memory_estimate

    one = memory_estimate(64, 2, 1000, "float32")
    s = Settings(preset="none", width=64, n_points=1000, ensemble=8, devices=4)
    check_memory(s, 1000, 2 * one, "cpu")  # 2 members a device fit
    with pytest.raises(UsageError, match="x 2 members a device"):
        check_memory(s, 1000, 2 * one - 1, "cpu")
    with pytest.raises(UsageError, match="x 8 members"):
        check_memory(s.replace(devices=1), 1000, 2 * one, "cpu")


def test_the_launcher_reports_the_first_failure_not_a_worker_it_killed(tmp_path):
    from hetapps import launch

    class Done:
        def __init__(self, code):
            self.returncode = code

    (tmp_path / "1.json").write_text(json.dumps(
        {"code": 1, "line": "error: torch process 1 of 3 failed: RuntimeError: boom",
         "time": 5.0}))
    procs = [Done(-signal.SIGKILL), Done(1), Done(launch.STOPPED)]
    # worker 0 hung in a collective and had to be killed: worker 1's line is the failure
    assert launch._first_failure(procs, str(tmp_path), 1, killed={0}) == (
        1, "error: torch process 1 of 3 failed: RuntimeError: boom")
    # a worker killed by someone else is the failure itself
    code, line = launch._first_failure(procs, str(tmp_path), 1)
    assert line.startswith("error: torch process 0 of 3 was killed by signal 9")
