"""The evaluate command in one framework: its outputs, its agreement with the train
command's own evaluation, and its refusals (exit 2, one line, nothing written)."""

import json
import os

import numpy as np
import pytest

from hetapps import evaluate, train
from hetcore import criteria, interchange, outputs

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


def test_test_data_file_is_the_held_out_data(tmp_path, capsys):
    held = tmp_path / "held.npz"
    rng = np.random.default_rng(0)
    hx = np.linspace(-2, 2, 37)
    np.savez(held, x=hx, y=np.sin(hx) + 0.1 * rng.standard_normal(37))
    out = tmp_path / "run"
    assert train.main(BASE + ["--test-data", str(held), "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["held_out"]["source"] == os.path.abspath(held) and m["held_out"]["n_points"] == 37
    assert "sigma_mae" not in m["test"] and "sigma_mae" in m["final"]
    assert m["config"]["test_data"] == str(held)
    curve = m["held_out"]["loss_at_chunk_ends"]
    assert curve["epochs"][-1] == 60 and curve["loss"][-1] == m["test"]["loss"]
    p = outputs.read_predictions(str(out / "test_predictions.csv"))
    np.testing.assert_array_equal(p["x"], hx.astype(np.float32))  # the run's dtype

    bad = tmp_path / "bad.csv"
    bad.write_text("x,z\n1,2\n")
    out2 = tmp_path / "run2"
    assert train.main(BASE + ["--test-data", str(bad), "--out", str(out2)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --test-data ") and "header" in err and not out2.exists()


def test_resume_refuses_other_held_out_data(tmp_path, capsys):
    held = tmp_path / "held.csv"
    held.write_text("x,y\n0,0\n1,0.8\n")
    run = ["--preset", "none", "--width", "4", "--epochs", "20", "--n-points", "10",
           "--no-progress", "--checkpoint-every", "5", "--test-data", str(held)]
    done = tmp_path / "done"
    assert train.main(run + ["--out", str(done)]) == 0
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    ck = "checkpoint-jax.safetensors"
    (unfinished / ck).write_bytes((done / ck).read_bytes())
    held.write_text("x,y\n0,0\n1,0.9\n")
    assert train.main(["--resume", str(unfinished), "--no-progress"]) == 2
    assert "held-out data differ" in capsys.readouterr().err
    held.write_text("x,y\n0,0\n1,0.8\n")
    assert train.main(["--resume", str(unfinished), "--no-progress"]) == 0
    a = json.loads((unfinished / "metrics.json").read_text())
    b = json.loads((done / "metrics.json").read_text())
    assert a["held_out"] == b["held_out"] and a["test"] == b["test"]


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_batched_predictions_equal_one_pass(framework, small_state, monkeypatch):
    from hetapps import registry

    backend = registry.backend(framework)
    w = small_state(width=16, depth=2)
    x = np.linspace(-3, 3, 50, dtype=np.float32).reshape(-1, 1)
    mu, var, _ = backend.predict(w, x, "cpu")
    monkeypatch.setattr(evaluate, "PREDICT_BATCH", 7)  # 8 batches, the last one padded
    bmu, bvar = evaluate.predict(backend, w, x, "cpu")
    # Rows are independent, but a product of 7 rows may take another kernel than one of
    # 50 and round otherwise: float32's single-step bound. (At 65536-point batches of 10^6
    # points both frameworks were measured bit for bit equal to one pass.)
    tol = criteria.SINGLE_STEP["float32"].tol
    np.testing.assert_allclose(bmu, mu[:, 0], rtol=tol, atol=tol)
    np.testing.assert_allclose(bvar, var[:, 0], rtol=tol, atol=tol)


def test_an_ensembles_stacked_file_is_evaluated_as_its_mixture(run_dir, tmp_path, capsys):
    """A stacked file (a leading member axis, as torch.func.stack_module_state gives it):
    the mixture's metrics, and each member's own, equal to evaluating the member alone."""
    other = tmp_path / "other"
    assert train.main(BASE[:3] + ["6"] + BASE[4:] + ["--out", str(other)]) == 0
    members = [interchange.read(str(d / "weights.safetensors")) for d in (run_dir, other)]
    stacked = tmp_path / "ensemble.safetensors"
    interchange.write(str(stacked), interchange.stack(members))
    common = ["--preset", "none", "--seed", "5", "--device", "cpu"]
    out = tmp_path / "ev"
    assert evaluate.main(["--weights", str(stacked), *common, "--out", str(out)]) == 0
    ev = json.loads((out / "metrics.json").read_text())
    assert ev["architecture"]["members"] == 2 and len(ev["members"]) == 2
    singles = []
    for k, d in enumerate((run_dir, other)):
        one = tmp_path / f"one{k}"
        assert evaluate.main(["--weights", str(d / "weights.safetensors"), *common,
                              "--out", str(one)]) == 0
        assert ev["members"][k] == json.loads((one / "metrics.json").read_text())["metrics"]
        singles.append(outputs.read_predictions(str(one / "predictions.csv")))
    mu = np.mean([p["mu"] for p in singles], axis=0)
    var = (np.mean([p["sigma"] ** 2 for p in singles], axis=0)
           + np.mean([(p["mu"] - mu) ** 2 for p in singles], axis=0))
    mixed = outputs.read_predictions(str(out / "predictions.csv"))
    np.testing.assert_allclose(mixed["mu"], mu, rtol=1e-15)
    np.testing.assert_allclose(mixed["sigma"], np.sqrt(var), rtol=1e-12)

    bad = dict(interchange.stack(members), **{"var_head.bias": members[0]["var_head.bias"]})
    path = tmp_path / "bad.safetensors"
    interchange.write(str(path), bad)
    _refused(["--weights", str(path)], capsys, tmp_path / "out-bad", "var_head.bias")


def test_bad_weights_metadata_is_refused(run_dir, tmp_path, capsys):
    """Metadata a weights file carries (an MSE run's constant sigma) is checked: a file
    whose metadata is not a JSON object, or whose sigma is not a positive number (a list of
    one per member for an ensemble), is refused in one line."""
    from safetensors.numpy import save_file

    state = interchange.read(str(run_dir / "weights.safetensors"))
    cases = {"text": "not json", "list": "[1, 2]", "word": '{"constant_sigma": "abc"}',
             "two": '{"constant_sigma": [1.0, 2.0]}', "negative": '{"constant_sigma": -1}'}
    for name, meta in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(state, str(path), metadata={interchange.METADATA_KEY: meta})
        _refused(["--weights", str(path), "--device", "cpu"], capsys, tmp_path / f"o-{name}",
                  "metadata")
    stacked = tmp_path / "stacked.safetensors"
    save_file(interchange.stack([state, state]), str(stacked),
              metadata={interchange.METADATA_KEY: '{"constant_sigma": [0.5]}'})
    _refused(["--weights", str(stacked), "--device", "cpu"], capsys, tmp_path / "o-st",
             "a list of 2")
