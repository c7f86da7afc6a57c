"""Checkpoints, resume after a real SIGKILL, and the same command giving the same bytes."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from hetcore import checkpoint, schedule
from hetapps.train import main
from hetcore.errors import UsageError
from tests.conftest import ROOT

# Slow enough per epoch (~1 ms) that a kill lands mid-run, small enough for CI.
RUN = ["--preset", "none", "--seed", "4", "--width", "96", "--depth", "2", "--n-points", "1500",
       "--epochs", "2400", "--lr", "0.002", "--device", "cpu", "--no-progress",
       "--chunk-epochs", "40", "--checkpoint-every", "80"]


def script(*argv):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "scripts", "train.py"), *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def results_of(out):
    m = json.loads(open(os.path.join(out, "metrics.json")).read())
    return m, load_file(os.path.join(out, "weights.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, framework):
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    args = RUN + ["--framework", framework]
    assert main(args + ["--out", full]) == 0

    proc = script(*args, "--out", cut)
    ckpt = os.path.join(cut, checkpoint.filename(framework))
    deadline = time.time() + 600  # generous: a loaded CI machine starts torch slowly
    while not os.path.exists(ckpt) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert os.path.exists(ckpt), "no checkpoint appeared in time"
    assert not os.path.exists(os.path.join(cut, "metrics.json"))
    epoch = checkpoint.load(ckpt).epoch
    assert 0 < epoch < 2400 and epoch % 80 == 0

    assert main(["--resume", cut, "--no-progress"]) == 0
    m_full, w_full = results_of(full)
    m_cut, w_cut = results_of(cut)
    assert m_cut["config"]["resumed_from_epoch"][framework] >= epoch
    assert m_cut["loss_history"] == m_full["loss_history"]
    assert m_cut["held_out"] == m_full["held_out"]  # the held-out loss of every chunk's end
    assert m_cut["test"] == m_full["test"]
    for n in w_full:
        np.testing.assert_array_equal(w_cut[n], w_full[n], err_msg=n)
    for name in ("predictions.csv", "test_predictions.csv", "initial_weights.safetensors"):
        assert open(os.path.join(cut, name), "rb").read() == open(os.path.join(full, name), "rb").read()


@pytest.mark.slow
def test_same_command_twice_gives_the_same_bytes(tmp_path):
    argv = ["--preset", "none", "--width", "8", "--depth", "2", "--n-points", "40", "--epochs",
            "30", "--device", "cpu", "--no-progress", "--framework", "both"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert main(argv + ["--out", a]) == 0
    assert main(argv + ["--out", b]) == 0
    for top, _, files in os.walk(a):
        for f in files:
            pa = os.path.join(top, f)
            pb = os.path.join(b, os.path.relpath(pa, a))
            if f == "metrics.json":
                ma, mb = (json.loads(open(p).read()) for p in (pa, pb))
                for m in (ma, mb):  # wall-clock times and the output path differ by nature
                    m.pop("timing")
                    m["config"].pop("out")
                assert ma == mb, pa
            else:
                assert open(pa, "rb").read() == open(pb, "rb").read(), pa


def test_metrics_record_what_a_rerun_needs(tmp_path):
    out = str(tmp_path / "r")
    assert main(["--preset", "none", "--seed", "7", "--width", "4", "--epochs", "3",
                 "--n-points", "10", "--no-progress", "--out", out]) == 0
    m, _ = results_of(out)
    assert m["config"]["seed"] == 7 and m["config"]["data_source"].startswith("synthetic")
    assert m["config"]["init_source"] == "jax init(seed=7)"
    assert len(m["config"]["data_sha256"]) == 64
    assert {"jax", "flax", "optax", "numpy", "python"} <= set(m["versions"])
    assert m["device"].startswith("cpu")


def test_resume_refusals(tmp_path, capsys):
    small = ["--preset", "none", "--width", "4", "--epochs", "20", "--n-points", "10",
             "--no-progress", "--checkpoint-every", "5"]
    done = str(tmp_path / "done")
    assert main(small + ["--out", done]) == 0
    assert main(["--resume", done]) == 2
    assert "finished already" in capsys.readouterr().err
    assert main(["--resume", str(tmp_path / "none")]) == 2
    assert "no such directory" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["--resume", str(empty)]) == 2
    assert "holds no checkpoint" in capsys.readouterr().err

    # A run killed after its last checkpoint but before writing: only the checkpoint stays.
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    ck = checkpoint.filename("jax")
    (unfinished / ck).write_bytes(open(os.path.join(done, ck), "rb").read())
    assert main(["--resume", str(unfinished), "--epochs", "50"]) == 2
    assert "--epochs 50 differs" in capsys.readouterr().err
    # An option given is seen even when it says the default: the run has 20 epochs.
    assert main(["--resume", str(unfinished), "--epochs", "500"]) == 2
    assert "--epochs 500 differs from the checkpoint's 20" in capsys.readouterr().err
    assert main(small + ["--out", str(unfinished)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["--resume", str(unfinished), "--no-progress"]) == 0
    m, _ = results_of(str(unfinished))
    m_done, _ = results_of(done)
    assert m["loss_history"] == m_done["loss_history"]

    # Of a --framework both run, one framework's checkpoint alone: that one resumes, the
    # other trains from the start (saying so), and both end where the whole run ends.
    both = str(tmp_path / "both")
    assert main(small + ["--framework", "both", "--out", both]) == 0
    capsys.readouterr()
    half = tmp_path / "half"
    half.mkdir()
    (half / ck).write_bytes(open(os.path.join(both, ck), "rb").read())
    assert main(["--resume", str(half), "--no-progress"]) == 0
    assert "no checkpoint of torch there; torch trains from the first epoch" in \
        capsys.readouterr().out
    for fw in ("jax", "torch"):
        assert results_of(str(half / fw))[0]["loss_history"] == \
            results_of(os.path.join(both, fw))[0]["loss_history"]


def test_damaged_checkpoints_are_refused(tmp_path):
    good = str(tmp_path / "good.safetensors")
    w = {n: np.ones(s, np.float32) for n, s in
         __import__("hetcore.interchange", fromlist=["x"]).shapes(4, 1).items()}
    settings = {**__import__("hetcore.settings", fromlist=["x"]).Settings(width=4, depth=1,
                epochs=10).to_dict()}
    c = checkpoint.Checkpoint("jax", 5, w, {}, np.zeros(5, np.float32), w, settings, "d")
    checkpoint.save(good, c)
    assert checkpoint.load(good).epoch == 5
    raw = open(good, "rb").read()
    cases = {
        "truncated": raw[: len(raw) // 2],
        "empty": b"",
    }
    for name, data in cases.items():
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(data)
        with pytest.raises(UsageError, match="not a valid safetensors"):
            checkpoint.load(str(p))
    bad = [
        (dict(epoch=11, loss_history=np.zeros(11, np.float32)), "outside"),
        (dict(loss_history=np.zeros(4, np.float32)), "loss_history"),
        (dict(loss_history=np.full(5, np.nan, np.float32)), "non-finite"),
        (dict(weights={**w, "var_head.bias": np.ones(2, np.float32)}), "var_head.bias"),
        (dict(settings={**settings, "width": 0}), "--width"),
        (dict(settings={**settings, "colour": "red"}), "settings do not fit"),
    ]
    for i, (change, message) in enumerate(bad):
        p = str(tmp_path / f"bad{i}.safetensors")
        checkpoint.save(p, checkpoint.Checkpoint(**{**c.__dict__, **change}))
        with pytest.raises(UsageError, match=message):
            checkpoint.load(p)


def test_spans_never_cross_a_checkpoint():
    got = list(schedule.spans(0, 23, 4, 10))
    assert [(s, n) for s, n, _ in got] == [(0, 4), (4, 4), (8, 2), (10, 4), (14, 4), (18, 2),
                                            (20, 3)]
    assert [s + n for s, n, c in got if c] == [10, 20, 23]
    assert list(schedule.spans(7, 9, 5, 0)) == [(7, 2, False)]


def test_a_resumed_run_times_the_epochs_it_ran(tmp_path, capsys):
    # The checkpoint's epochs were timed by the run that wrote them: a run resumed at epoch
    # 5 of 10 reports 5 epochs, and one resumed at its final epoch reports none (no time an
    # epoch), where both had divided this command's seconds by all 10.
    out = str(tmp_path / "r")
    argv = ["--preset", "none", "--width", "4", "--epochs", "10", "--n-points", "16",
            "--checkpoint-every", "5", "--no-progress", "--framework", "jax"]
    assert main(argv + ["--out", out]) == 0
    path = os.path.join(out, checkpoint.filename("jax"))
    final = checkpoint.load(path)
    assert final.epoch == 10
    for epoch, ran in [(5, 5), (10, 0)]:
        checkpoint.save(path, dataclasses.replace(final, epoch=epoch,
                                                  loss_history=final.loss_history[:epoch]))
        os.remove(os.path.join(out, "metrics.json"))
        capsys.readouterr()
        assert main(["--resume", out, "--no-progress"]) == 0
        t = results_of(out)[0]["timing"]
        assert t["epochs"] == ran, epoch
        if ran:
            assert t["ms_per_epoch"] == pytest.approx(1e3 * t["train_s"] / ran)
        else:
            assert t["ms_per_epoch"] is None
        assert f"{ran} epochs (resumed at epoch {epoch})" in capsys.readouterr().out
