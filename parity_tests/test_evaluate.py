"""One framework's weights evaluated in the other: the same predictions to float32 rounding
and the same metrics; and the metrics of both frameworks' runs within the reach of their
predictions' gaps."""

import json

import numpy as np
import pytest

from hetapps import evaluate, train
from hetcore import criteria, outputs

BASE = ["--preset", "none", "--seed", "3", "--width", "32", "--depth", "2", "--epochs", "120",
        "--no-progress"]
# float32 rounding of the forward pass (hetcore.criteria.SINGLE_STEP, measured <= 3.5e-7);
# float64: 1e-12, the same criterion's bound.
PREDICTION_TOL = {"float32": 1e-5, "float64": 1e-12}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("trained,evaluated", [("jax", "torch"), ("torch", "jax")])
def test_weights_of_one_framework_evaluated_in_the_other(tmp_path, device, trained, evaluated,
                                                         dtype):
    run = tmp_path / "run"
    assert train.main(BASE + ["--framework", trained, "--dtype", dtype, "--device", device,
                              "--out", str(run)]) == 0
    out = tmp_path / "ev"
    assert evaluate.main(["--weights", str(run / "weights.safetensors"), "--preset", "none",
                          "--seed", "3", "--split", "held-out", "--framework", evaluated,
                          "--device", device, "--out", str(out)]) == 0
    theirs = outputs.read_predictions(str(run / "test_predictions.csv"))
    ours = outputs.read_predictions(str(out / "predictions.csv"))
    np.testing.assert_array_equal(ours["x"], theirs["x"])
    np.testing.assert_array_equal(ours["y"], theirs["y"])
    tol = PREDICTION_TOL[dtype]
    for k in ("mu", "sigma"):
        scale = max(1.0, float(np.max(np.abs(theirs[k]))))
        assert np.max(np.abs(ours[k] - theirs[k])) <= tol * scale, k
    ran = json.loads((run / "metrics.json").read_text())["test"]
    ev = json.loads((out / "metrics.json").read_text())["metrics"]
    assert set(ev) == set(ran) - {"loss"}
    # the metrics within the reach of these very predictions' gaps
    checks = criteria.metric_checks(
        "test", ran, ev, theirs["y"], (theirs["mu"], theirs["sigma"]), (ours["mu"], ours["sigma"]),
        np.abs(ours["mu"] - theirs["mu"]), np.abs(ours["sigma"] - theirs["sigma"]), dtype,
        "the predictions' own gaps")
    assert not criteria.failures(checks), [c.message() for c in criteria.failures(checks)]
    for key in ("nll_full", "crps", "check_score", "interval_score", "sharpness"):
        assert ev[key] == pytest.approx(ran[key], rel=10 * tol), key


def test_framework_both_compares_the_metrics_of_both_runs(tmp_path, device):
    out = tmp_path / "both"
    assert train.main(BASE + ["--framework", "both", "--device", device, "--out", str(out)]) == 0
    rep = json.loads((out / "parity.json").read_text())["metrics"]
    assert rep["pass"], [c for c in rep["checks"] if not c["ok"]]
    names = {c["quantity"] for c in rep["checks"]}
    assert {"crps (training data)", "crps (held-out data)", "mace (held-out data)"} <= names
    for c in rep["checks"]:
        assert c["bound"] > 0 and c["reason"]
