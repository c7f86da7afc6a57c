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
