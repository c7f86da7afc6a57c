"""An ensemble across the frameworks: from the same stacked weights, the same members'
trajectories (float64 within 1e-10), and float32 metrics within their predictions' reach."""

import json

import numpy as np
import pytest

import jaxhet.backend as jb
import torchhet.backend as tb
from hetapps import train
from hetcore import data, driver, interchange
from hetcore.settings import Settings

TARGET = 1e-10


@pytest.mark.parametrize("recipe", [{}, dict(optimizer="adamw", lr=3e-3, batch_size=20,
                                             schedule="cosine", warmup_steps=4)])
def test_an_ensemble_from_the_same_stacked_weights_trains_alike(device, recipe):
    s = Settings(framework="both", preset="none", seed=1, width=16, depth=2, n_points=60,
                 epochs=30, chunk_epochs=11, dtype="float64", device=device, ensemble=3,
                 **recipe)
    ds = data.for_settings(s)
    x, y = ds.columns("float64")
    w = interchange.stack([tb.init_weights(16, 2, "float64", k) for k in range(3)])
    runs = {n: driver.train(b, s.replace(framework=n), x, y, w) for n, b in
            (("jax", jb), ("torch", tb))}
    np.testing.assert_allclose(runs["jax"].member_losses, runs["torch"].member_losses,
                               rtol=0, atol=TARGET)
    for n in w:
        np.testing.assert_allclose(runs["jax"].weights[n], runs["torch"].weights[n], rtol=0,
                                   atol=TARGET)
    np.testing.assert_allclose(runs["jax"].mu, runs["torch"].mu, rtol=0, atol=TARGET)


def test_framework_both_compares_two_ensembles(tmp_path, device):
    out = tmp_path / "both"
    assert train.main(["--framework", "both", "--preset", "none", "--seed", "4", "--width",
                       "16", "--epochs", "40", "--ensemble", "2", "--device", device,
                       "--no-progress", "--out", str(out)]) == 0
    rep = json.loads((out / "parity.json").read_text())
    assert rep["initial_weights_identical"]
    assert rep["metrics"]["pass"], [c for c in rep["metrics"]["checks"] if not c["ok"]]
    assert rep["loss_history"]["max_abs"] < 1e-4


@pytest.mark.slow
def test_the_parity_command_checks_an_ensemble(tmp_path, device, capsys):
    """Every member's single-step quantities and losses per epoch, the stacked weights and
    the mixture's band, in both dtypes; from a stacked file, and failing where one
    member's starting weights differ between the frameworks."""
    from hetapps import parity

    w = interchange.stack([tb.init_weights(8, 2, "float32", 10 + k) for k in range(3)])
    path = tmp_path / "stacked.safetensors"
    interchange.write(str(path), w)
    argv = ["--preset", "none", "--seed", "2", "--width", "8", "--n-points", "40", "--epochs",
            "25", "--ensemble", "3", "--batch-size", "16", "--optimizer", "adam",
            "--floor-runs", "1", "--grid-points", "51", "--quiet", "--device", device,
            "--init-from", str(path)]
    out = tmp_path / "ok"
    assert parity.main(argv + ["--out", str(out)]) == 0, capsys.readouterr().out[-3000:]
    rep = json.loads((out / "parity.json").read_text())
    names = {c["quantity"] for c in rep["dtypes"]["float64"]["checks"]}
    assert {"member 2: grad layers.0.weight", "member 1: loss per epoch",
            "final layers.0.weight", "sigma on the grid (51 points)"} <= names
    assert rep["settings"]["float32"]["ensemble"] == 3

    # One member's starting weights moved for torch alone: its checks fail, and the
    # command says so with exit 1.
    real = tb.engine

    def nudged(settings, x, y, weights, *a, **kw):
        weights = {n: v.copy() for n, v in weights.items()}
        weights["mean_head.bias"][1] += 0.01
        return real(settings, x, y, weights, *a, **kw)

    path64 = tmp_path / "stacked64.safetensors"  # --dtype float64 alone takes float64 files
    interchange.write(str(path64), interchange.cast(w, "float64"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tb, "engine", nudged)
        bad = tmp_path / "bad"
        assert parity.main(argv[:-1] + [str(path64), "--dtype", "float64", "--out",
                                        str(bad)]) == 1
    failed = json.loads((bad / "parity.json").read_text())["dtypes"]["float64"]["failed"]
    assert any(f.startswith("member 1: loss per epoch") for f in failed), failed
    assert not any(f.startswith("member 0: loss per epoch") for f in failed), failed
