"""scripts/parity.py: one command, a table, parity.json and a figure; exit 0 on agreement,
1 on a failed check, 2 with one line `error: ...` on bad usage or input, nothing written.

Data and weights for the user's-own case are made here with numpy and safetensors
directly, not through the project's writers.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from hetapps import parity as parity_command
from hetcore import interchange

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--preset", "none", "--width", "8", "--depth", "2", "--n-points", "40",
         "--epochs", "30", "--lr", "0.01", "--floor-runs", "1", "--grid-points", "101",
         "--quiet"]


def user_files(tmp_path, width=8, depth=2, dtype="float32", n=40):
    rng = np.random.default_rng(42)
    x = np.sort(rng.uniform(-2, 2, n))
    y = np.cos(x) + 0.05 * rng.standard_normal(n)
    data = tmp_path / "data.csv"
    data.write_text("x,y\n" + "".join(f"{float(a)!r},{float(b)!r}\n" for a, b in zip(x, y)))
    weights = {n_: (0.3 * rng.standard_normal(s)).astype(dtype)
               for n_, s in interchange.shapes(width, depth).items()}
    path = tmp_path / "w.safetensors"
    save_file(weights, str(path))
    return str(data), str(path), weights


@pytest.mark.slow
@pytest.mark.slow
@pytest.mark.parametrize("recipe", [
    ["--optimizer", "adam", "--batch-size", "12", "--schedule", "cosine", "--warmup-steps",
     "5", "--loss", "beta-nll", "--beta", "0.3"],
    ["--loss", "mse", "--momentum", "0.9", "--nesterov", "--batch-size", "16"],
], ids=["adam-batches-cosine-beta-nll", "mse-nesterov"])
def test_any_recipe_passes_the_parity_command(tmp_path, capsys, device, recipe):
    out = tmp_path / "report"
    rc = parity_command.main([*SMALL, "--seed", "2", "--device", device, "--out", str(out),
                              *recipe])
    text = capsys.readouterr().out
    assert rc == 0, text
    report = json.loads((out / "parity.json").read_text())
    assert report["pass"] is True
    for dt, s in report["settings"].items():
        assert s["batch_size"] in (12, 16) and s["loss"] in ("beta-nll", "mse")


def test_command_end_to_end(tmp_path, device):
    """A subprocess, as a user runs it: exit 0, the table, parity.json, the figure."""
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "parity.py"), *SMALL, "--seed", "3",
         "--device", device, "--out", str(out)],
        capture_output=True, text=True, cwd=str(tmp_path), timeout=600,
        env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"},  # see conftest
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    header = proc.stdout.splitlines()[0].split()
    assert header[:3] == ["quantity", "dtype", "max"] and header[-2:] == ["bound", "pass"]
    assert "grad layers.2.weight" in proc.stdout and "loss per epoch" in proc.stdout
    report = json.loads((out / "parity.json").read_text())
    assert report["pass"] is True
    assert set(report["dtypes"]) == {"float32", "float64"}
    f32 = report["dtypes"]["float32"]
    quantities = {c["quantity"].split(", epochs")[0] for c in f32["checks"]}
    assert {"mu", "var", "loss", "grad var_head.bias", "one SGD step layers.0.weight",
            "loss per epoch", "final mean_head.weight", "sigma on the grid (101 points)",
            "loss vs float64 reference (jax)", "loss vs float64 reference (torch)"} <= quantities
    assert f32["loss_per_epoch"]["info"]["worst_ratio_correlated"] < 1
    assert len(f32["curves"]["floor_gaps"]) == 2 and len(f32["curves"]["gap"]) == 30
    assert "loss_history" in f32["compare"]
    for c in f32["checks"]:
        assert c["reason"], c["quantity"]
    for ext in ("png", "svg"):
        assert (out / f"parity.{ext}").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_users_own_data_and_weights(tmp_path, capsys, device, dtype):
    data, weights, state = user_files(tmp_path, dtype=dtype)
    out = tmp_path / "r"
    rc = parity_command.main([*SMALL, "--data", data, "--init-from", weights, "--dtype", dtype,
                           "--device", device, "--out", str(out)])
    assert rc == 0, capsys.readouterr()
    report = json.loads((out / "parity.json").read_text())
    assert report["init_source"] == os.path.abspath(weights)
    assert report["data_source"] == os.path.abspath(data)
    assert list(report["dtypes"]) == [dtype]


@pytest.mark.slow
def test_both_dtypes_accept_a_float64_file(tmp_path, capsys, device):
    data, weights, _ = user_files(tmp_path, dtype="float64")
    rc = parity_command.main([*SMALL, "--data", data, "--init-from", weights, "--device", device,
                           "--epochs", "5", "--out", str(tmp_path / "r")])
    assert rc == 0, capsys.readouterr()


def bad_cases(tmp_path):
    data, weights, state = user_files(tmp_path)
    nan_csv = tmp_path / "nan.csv"
    nan_csv.write_text("x,y\n0.0,1.0\nnan,2.0\n")
    inf_w = dict(state)
    inf_w["layers.2.bias"] = inf_w["layers.2.bias"].copy()
    inf_w["layers.2.bias"][3] = np.inf
    save_file(inf_w, str(tmp_path / "inf.safetensors"))
    return {
        "weights of another width": (["--init-from", weights, "--width", "9"], "layers.0.weight"),
        "weights of another depth": (["--init-from", weights, "--depth", "3"], "layers.4"),
        "weights of another dtype": (["--init-from", weights, "--dtype", "float64"], "float32"),
        "non-finite data": (["--data", str(nan_csv)], "x[1]"),
        "non-finite weights": (["--init-from", str(tmp_path / "inf.safetensors")], "layers.2.bias"),
        "missing data file": (["--data", str(tmp_path / "none.npz")], "no such file"),
        "zero twin runs": (["--floor-runs", "0"], "--floor-runs"),
        "bad learning rate": (["--lr", "-1"], "--lr"),
    }


@pytest.mark.parametrize("case", ["weights of another width", "weights of another depth",
                                  "weights of another dtype", "non-finite data",
                                  "non-finite weights", "missing data file", "zero twin runs",
                                  "bad learning rate"])
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys, case):
    extra, names = bad_cases(tmp_path)[case]
    out = tmp_path / "out"
    rc = parity_command.main([*SMALL, "--seed", "1", "--out", str(out), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: ") and names in err[0], err
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if "staging" in p]


def test_unknown_option_exits_2_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "parity.py"), "--no-such-option",
         "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


def test_existing_report_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "r"
    out.mkdir()
    (out / "parity.json").write_text("{}")
    rc = parity_command.main([*SMALL, "--seed", "1", "--out", str(out)])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "parity.json").read_text() == "{}"
