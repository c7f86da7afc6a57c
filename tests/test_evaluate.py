"""The evaluate command in one framework: its outputs, its agreement with the train
command's own evaluation, and its refusals (exit 2, one line, nothing written)."""

import json
import os

import numpy as np
import pytest

from hetapps import evaluate, train
from hetcore import interchange, outputs

BASE = ["--preset", "none", "--seed", "5", "--width", "8", "--depth", "2", "--epochs", "60",
        "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    assert train.main(BASE + ["--out", str(out)]) == 0
    return out


def test_evaluating_a_run_on_its_held_out_draw_gives_its_test_block(run_dir, tmp_path):
    out = tmp_path / "ev"
    assert evaluate.main(["--weights", str(run_dir / "weights.safetensors"), "--preset", "none",
                          "--seed", "5", "--split", "held-out", "--device", "cpu",
                          "--out", str(out)]) == 0
    ran = json.loads((run_dir / "metrics.json").read_text())
    ev = json.loads((out / "metrics.json").read_text())
    test = {k: v for k, v in ran["test"].items() if k != "loss"}
    assert ev["metrics"] == test  # same framework, same weights, same data: bit for bit
    assert ev["framework"] == "jax" and ev["data"].startswith("held-out(")
    assert ev["weights"] == os.path.abspath(run_dir / "weights.safetensors")
    p = outputs.read_predictions(str(out / "predictions.csv"))
    q = outputs.read_predictions(str(run_dir / "test_predictions.csv"))
    assert list(p) == ["x", "y", "mu", "sigma"]
    for k in p:
        np.testing.assert_array_equal(p[k], q[k])
    assert sorted(os.listdir(out)) == ["calibration.png", "calibration.svg", "fit.png",
                                       "fit.svg", "metrics.json", "predictions.csv"]


def test_evaluating_on_a_data_file(run_dir, tmp_path):
    xy = tmp_path / "d.csv"
    xy.write_text("x,y\n0.5,0.4\n-1,-0.9\n2,0.95\n")
    out = tmp_path / "ev"
    assert evaluate.main(["--weights", str(run_dir / "weights.safetensors"), "--data", str(xy),
                          "--device", "cpu", "--out", str(out)]) == 0
    ev = json.loads((out / "metrics.json").read_text())
    assert "sigma_mae" not in ev["metrics"]  # the user's data: no known noise level
    assert ev["n_points"] == 3 and set(ev["metrics"]) >= {"crps", "mace", "coverage_2sigma"}


def test_an_mse_runs_weights_are_evaluated_with_the_sigma_it_reported(tmp_path):
    run = tmp_path / "mse"
    assert train.main(BASE + ["--loss", "mse", "--out", str(run)]) == 0
    out = tmp_path / "ev"
    assert evaluate.main(["--weights", str(run / "weights.safetensors"), "--preset", "none",
                          "--seed", "5", "--device", "cpu", "--out", str(out)]) == 0
    a = outputs.read_predictions(str(run / "predictions.csv"))["sigma"]
    b = outputs.read_predictions(str(out / "predictions.csv"))["sigma"]
    np.testing.assert_array_equal(a, b)


def _refused(argv, capsys, out, needle):
    assert evaluate.main(argv + ["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert needle in err, err
    assert not out.exists()


def test_bad_weights_are_refused_naming_the_tensor(run_dir, tmp_path, capsys):
    state = interchange.read(str(run_dir / "weights.safetensors"))
    cases = {
        "missing": {k: v for k, v in state.items() if k != "var_head.bias"},
        "shape": {**state, "mean_head.weight": np.zeros((1, 3), np.float32)},
        "mixed": {**state, "var_head.bias": state["var_head.bias"].astype(np.float64)},
        "nan": {**state, "layers.2.bias": np.full_like(state["layers.2.bias"], np.nan)},
    }
    needles = {"missing": "var_head.bias", "shape": "mean_head.weight",
               "mixed": "var_head.bias", "nan": "layers.2.bias"}
    for name, bad in cases.items():
        path = tmp_path / f"{name}.safetensors"
        interchange.write(str(path), bad)
        _refused(["--weights", str(path)], capsys, tmp_path / f"out-{name}", needles[name])
    pickle = tmp_path / "w.pt"
    pickle.write_bytes(b"\x80\x04junk")
    _refused(["--weights", str(pickle)], capsys, tmp_path / "out-pickle", "pickle")
    _refused(["--weights", str(tmp_path / "none.safetensors")], capsys, tmp_path / "o",
             "no such file")


def test_bad_data_device_and_options_are_refused(run_dir, tmp_path, capsys):
    w = ["--weights", str(run_dir / "weights.safetensors")]
    bad = tmp_path / "bad.csv"
    bad.write_text("x,y\n1,nan\n")
    _refused(w + ["--data", str(bad)], capsys, tmp_path / "o1", "--data")
    _refused(w + ["--data", str(bad), "--seed", "3"], capsys, tmp_path / "o2", "--seed")
    _refused(w + ["--device", "gpu"], capsys, tmp_path / "o3", "--device gpu")
    _refused(w + ["--n-points", "0"], capsys, tmp_path / "o4", "--n-points")
    _refused(w + ["--n-points", str(10**12)], capsys, tmp_path / "o5", "GiB")
    with pytest.raises(SystemExit) as e:  # argparse's own refusal, in the one-line format
        evaluate.main(w + ["--framework", "mxnet", "--out", str(tmp_path / "o6")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: argument --framework") and "\n" not in err


def test_an_existing_run_is_not_overwritten(run_dir, capsys):
    before = {n: (run_dir / n).read_bytes() for n in os.listdir(run_dir)}
    assert evaluate.main(["--weights", str(run_dir / "weights.safetensors"), "--device", "cpu",
                          "--out", str(run_dir)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert {n: (run_dir / n).read_bytes() for n in os.listdir(run_dir)} == before
