"""The train command end to end: files, exit codes, messages."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from hetcore import interchange
from hetapps import registry
from hetapps.train import main
from hetcore.outputs import RUN_FILES, read_predictions
from tests.conftest import ROOT

SMALL = ["--preset", "none", "--width", "8", "--depth", "1", "--n-points", "24",
         "--epochs", "6", "--device", "cpu", "--no-progress"]


def listing(path):
    """Every file under path with its bytes, to prove nothing changed."""
    out = {}
    for top, _, files in os.walk(path):
        for f in files:
            p = os.path.join(top, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = fh.read()
    return out


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_train_writes_a_complete_run(tmp_path, capsys, framework):
    out = tmp_path / "run"
    assert main(SMALL + ["--framework", framework, "--out", str(out), "--seed", "3"]) == 0
    assert sorted(os.listdir(out)) == sorted(RUN_FILES)
    m = json.loads((out / "metrics.json").read_text())
    assert m["framework"] == framework and m["dtype"] == "float32"
    assert m["config"]["epochs"] == 6 and m["config"]["seed"] == 3
    assert len(m["loss_history"]) == 6
    assert set(m["final"]) >= {"loss", "rmse", "nll", "coverage_1sigma", "coverage_2sigma",
                               "coverage_3sigma", "sigma_mae"}
    assert 0 <= m["final"]["coverage_1sigma"] <= m["final"]["coverage_2sigma"] <= 1
    assert {"compile_s", "train_s"} <= set(m["timing"])
    assert framework in m["versions"]
    pred = read_predictions(str(out / "predictions.csv"))
    np.testing.assert_array_equal(pred["x"], np.linspace(-3, 3, 24).astype(np.float32))
    assert np.all(pred["sigma"] > 0)
    w0 = load_file(str(out / "initial_weights.safetensors"))
    w1 = load_file(str(out / "weights.safetensors"))
    interchange.check(w0, 8, 1, "float32")
    interchange.check(w1, 8, 1, "float32")
    # predictions.csv is exactly the final model's output, read back without loss.
    mod = registry.backend(framework)
    x = pred["x"].astype(np.float32).reshape(-1, 1)
    mu, var, _ = mod.predict(w1, x, device="cpu")
    np.testing.assert_array_equal(pred["mu"], mu[:, 0].astype(np.float64))
    np.testing.assert_array_equal(pred["sigma"], np.sqrt(var[:, 0].astype(np.float64)))
    assert "final loss" in capsys.readouterr().out
    assert (out / "fit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in (out / "fit.svg").read_bytes()[:2000]


def test_both_frameworks_start_alike_and_compare(tmp_path):
    out = tmp_path / "both"
    assert main(SMALL + ["--framework", "both", "--out", str(out), "--dtype", "float64"]) == 0
    assert {"jax", "torch", "parity.json", "parity.png", "parity.svg"} <= set(os.listdir(out))
    wj = load_file(str(out / "jax" / "initial_weights.safetensors"))
    wt = load_file(str(out / "torch" / "initial_weights.safetensors"))
    for n in wj:
        np.testing.assert_array_equal(wj[n], wt[n])
    report = json.loads((out / "parity.json").read_text())
    assert report["initial_weights_identical"]
    # 6 float64 epochs of a tiny net: only rounding separates the frameworks.
    assert report["loss_history"]["max_abs"] < 1e-12
    assert report["sigma"]["max_abs"] < 1e-12


def test_init_from_reproduces_a_run(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(SMALL + ["--out", str(a), "--seed", "5"]) == 0
    assert main(SMALL + ["--out", str(b), "--seed", "6",
                         "--init-from", str(a / "initial_weights.safetensors")]) == 0
    ha = json.loads((a / "metrics.json").read_text())["loss_history"]
    hb = json.loads((b / "metrics.json").read_text())
    assert hb["config"]["init_source"].endswith("initial_weights.safetensors")
    # Same weights, different data (seed 6): the first loss must differ, the weights agree.
    assert ha[0] != hb["loss_history"][0]
    wa = load_file(str(a / "initial_weights.safetensors"))
    wb = load_file(str(b / "initial_weights.safetensors"))
    assert all(np.array_equal(wa[n], wb[n]) for n in wa)


def test_data_file_is_used(tmp_path):
    x = np.linspace(0, 1, 10)
    np.savez(tmp_path / "d.npz", x=x, y=2 * x)
    out = tmp_path / "run"
    assert main(SMALL + ["--data", str(tmp_path / "d.npz"), "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["n_points_used"] == 10
    assert "sigma_mae" not in m["final"]  # the truth is unknown for user data


def test_existing_run_is_kept_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(SMALL + ["--out", str(out)]) == 0
    before = listing(out)
    assert main(SMALL + ["--out", str(out), "--seed", "9"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert listing(out) == before
    assert main(SMALL + ["--out", str(out), "--seed", "9", "--overwrite"]) == 0
    assert listing(out)["metrics.json"] != before["metrics.json"]
    assert not [n for n in os.listdir(tmp_path) if "staging" in n]


BAD = {
    "epochs": (["--epochs", "0"], "--epochs"),
    "width": (["--width", "0"], "--width"),
    "depth": (["--depth", "-1"], "--depth"),
    "lr nan": (["--lr", "nan"], "--lr"),
    "lr negative": (["--lr", "-0.1"], "--lr"),
    "lr inf": (["--lr", "inf"], "--lr"),
    "n-points": (["--n-points", "0"], "--n-points"),
    "seed": (["--seed", "-1"], "--seed"),
    "device": (["--device", "tpu"], "available"),
    "data missing": (["--data", "/nonexistent/d.csv"], "no such file"),
    "init missing": (["--init-from", "/nonexistent/w.safetensors"], "no such file"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, case):
    argv, needle = BAD[case]
    out = tmp_path / "run"
    assert main(SMALL + ["--out", str(out)] + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not out.exists()
    assert os.listdir(tmp_path) == []


def test_misfit_weights_name_the_tensor(tmp_path, capsys, small_state):
    path = str(tmp_path / "w.safetensors")
    interchange.write(path, small_state(width=8, depth=2))
    assert main(SMALL + ["--init-from", path, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "unexpected tensor 'layers.2.bias'" in err
    assert not (tmp_path / "run").exists()


def test_argparse_errors_exit_2(capsys):
    for argv in (["--epochs", "ten"], ["--framework", "mxnet"], ["--bogus"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        assert "error:" in capsys.readouterr().err


def run_script(*argv, cwd=None):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "train.py"), *argv],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


@pytest.mark.slow
def test_script_divergence_exits_1_naming_the_epoch(tmp_path):
    out = tmp_path / "run"
    p = run_script(*SMALL, "--lr", "1e6", "--epochs", "50", "--out", str(out))
    assert p.returncode == 1, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "epoch" in lines[0], p.stderr
    assert "Traceback" not in p.stderr
    assert not out.exists()


@pytest.mark.slow
def test_script_bad_input_and_default_out(tmp_path):
    p = run_script(*SMALL, "--data", str(tmp_path / "missing.npz"), cwd=tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.startswith("error: --data")
    assert not (tmp_path / "runs").exists()
    p = run_script(*SMALL, "--framework", "torch", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    (run,) = os.listdir(tmp_path / "runs")
    assert sorted(os.listdir(tmp_path / "runs" / run)) == sorted(RUN_FILES)


@pytest.mark.slow
def test_remat_option_trains_the_same_run(tmp_path):
    # --remat recomputes the trunk in the backward pass: the same losses, recorded as used.
    common = ["--framework", "both", "--depth", "4", "--seed", "5", "--dtype", "float64"]
    small = [a for a in SMALL if a not in ("--depth", "1")] + common
    assert main(small + ["--out", str(tmp_path / "plain")]) == 0
    assert main(small + ["--remat", "--out", str(tmp_path / "remat")]) == 0
    for fw in ("jax", "torch"):
        plain = json.loads((tmp_path / "plain" / fw / "metrics.json").read_text())
        remat = json.loads((tmp_path / "remat" / fw / "metrics.json").read_text())
        assert remat["config"]["remat"] is True and plain["config"]["remat"] is False
        np.testing.assert_allclose(remat["loss_history"], plain["loss_history"], rtol=1e-12)
        if sys.platform.startswith("linux"):
            assert remat["config"]["host_malloc"].startswith("glibc, freed blocks kept")


def test_a_recipe_run_records_every_training_option(tmp_path):
    out = tmp_path / "run"
    argv = [a for a in SMALL if a not in ("--epochs", "6")] + [
        "--epochs", "4", "--optimizer", "adamw", "--weight-decay", "0.01", "--lr", "0.01",
        "--schedule", "cosine", "--warmup-steps", "3", "--batch-size", "7",
        "--shuffle-seed", "5", "--loss", "beta-nll", "--beta", "0.25", "--out", str(out)]
    assert main(argv) == 0
    c = json.loads((out / "metrics.json").read_text())["config"]
    assert {k: c[k] for k in ("recipe", "loss", "beta", "optimizer", "momentum", "nesterov",
                              "weight_decay", "schedule", "warmup_steps", "lr_end",
                              "batch_size", "shuffle_seed")} == dict(
        recipe="lecture", loss="beta-nll", beta=0.25, optimizer="adamw", momentum=None,
        nesterov=None, weight_decay=0.01, schedule="cosine", warmup_steps=3, lr_end=0.0,
        batch_size=7, shuffle_seed=5)


def test_a_diverging_mini_batch_run_names_epoch_and_batch(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(SMALL + ["--lr", "1e6", "--momentum", "0.9", "--batch-size", "8",
                         "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(r"epoch \d+, batch \d of 3", err[0]), err
    assert not out.exists()


def test_the_loss_comparison_writes_three_fits(tmp_path):
    from hetapps.compare import main as compare

    out = tmp_path / "cmp"
    assert compare(["--epochs", "3", "--warmup-steps", "1", "--n-points", "30", "--width",
                    "8", "--depth", "1", "--device", "cpu", "--no-progress",
                    "--out", str(out)]) == 0
    report = json.loads((out / "compare.json").read_text())
    assert list(report["fits"]) == ["mse", "nll", "beta-nll"]
    assert report["data_source"] == "two-sines(n_points=30, seed=0)"
    for loss in ("mse", "nll", "beta-nll"):
        m = json.loads((out / loss / "metrics.json").read_text())
        assert m["config"]["loss"] == loss and m["config"]["recipe"] == "calibrated"
        assert {"sigma_mae", "mean_rmse"} <= set(m["final"])
        pred = read_predictions(str(out / loss / "predictions.csv"))
        if loss == "mse":  # one sigma, the residuals' RMS, at every x
            assert np.ptp(pred["sigma"]) == 0
    assert (out / "losses.png").read_bytes()[:4] == b"\x89PNG"
