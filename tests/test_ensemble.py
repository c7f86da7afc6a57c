"""--ensemble K: member k is the single run from its own initial weights and shuffle seed
(float64 within 1e-10, in each framework); the train command's ensemble outputs; refusals."""

import json

import numpy as np
import pytest

from hetapps import evaluate, registry, train
from hetcore import data, driver, interchange, metrics, outputs
from hetcore.settings import Settings

RECIPES = {"sgd": {}, "adam-batches": dict(optimizer="adam", lr=3e-3, batch_size=24),
           "mse-adamw-cosine": dict(loss="mse", optimizer="adamw", lr=3e-3, schedule="cosine",
                                    warmup_steps=5)}
TARGET = 1e-10  # float64: member k against its single run


@pytest.mark.parametrize("framework", ["jax", "torch"])
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_member_k_is_its_single_run(framework, recipe):
    backend = registry.backend(framework)
    s = Settings(framework=framework, preset="none", seed=3, width=16, depth=2, n_points=64,
                 epochs=40, chunk_epochs=15, dtype="float64", device="cpu", ensemble=3,
                 shuffle_seed=5, **RECIPES[recipe])
    ds = data.for_settings(s)
    x, y = ds.columns(s.dtype)
    hx, hy = data.held_out(s, ds).columns(s.dtype)
    w, source = driver.initial_weights(s, backend)
    assert source == f"{framework} init(seed=3...5)"
    r = driver.train(backend, s, x, y, w, held_out=(hx, hy))
    members = interchange.unstack(r.weights)
    for k, wk in enumerate(interchange.unstack(w)):
        np.testing.assert_array_equal(wk["layers.0.weight"], backend.init_weights(
            16, 2, "float64", 3 + k)["layers.0.weight"])  # member k's own initial draw
        single = driver.train(backend, s.replace(ensemble=1, shuffle_seed=5 + k), x, y, wk,
                              held_out=(hx, hy))
        np.testing.assert_allclose(r.member_losses[:, k], single.loss_history, rtol=0,
                                   atol=TARGET)
        for n in single.weights:
            np.testing.assert_allclose(members[k][n], single.weights[n], rtol=0, atol=TARGET)
        np.testing.assert_allclose(r.members.mu[k], single.mu, rtol=0, atol=TARGET)
        np.testing.assert_allclose(r.members.var[k], single.var, rtol=0, atol=TARGET)
        np.testing.assert_allclose(r.held_out_members.mu[k], single.held_out.mu, rtol=0,
                                   atol=TARGET)
    mu, var = metrics.mixture(r.members.mu, r.members.var)
    np.testing.assert_array_equal(r.mu, mu)
    np.testing.assert_array_equal(r.var, var)
    np.testing.assert_array_equal(r.loss_history, r.member_losses.mean(axis=1))


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["sgd", "adamw-cosine-batches"])
def test_torch_compiled_ensemble_trains_the_torch_func_run(recipe):
    # --loop compile-update: the members' updates compiled whole (torchhet/whole.py), the
    # same run as torch.func's program to float64 rounding: full batches four epochs a
    # call, and batches of 7 of 40 points (a call of four, one of one, a shorter last one).
    options = {"sgd": {}, "adamw-cosine-batches": dict(
        optimizer="adamw", lr=0.01, weight_decay=0.05, schedule="cosine", warmup_steps=5,
        batch_size=7)}[recipe]
    backend = registry.backend("torch")
    x, y = data.synthetic(40, 5).columns("float64")
    w = interchange.stack([interchange.draw_initial(16, 2, "float64", seed=3 + k)
                           for k in range(3)])
    s = Settings(framework="torch", device="cpu", preset="none", width=16, n_points=40,
                 dtype="float64", epochs=9, chunk_epochs=4, ensemble=3,
                 **{"lr": 0.05, **options})
    ref = driver.train(backend, s, x, y, w)
    r = driver.train(backend, s.replace(loop="compile-update"), x, y, w)
    assert (ref.loop, r.loop) == ("func", "compile-update")
    np.testing.assert_allclose(r.member_losses, ref.member_losses, rtol=0, atol=1e-12)
    for n in ref.weights:
        np.testing.assert_allclose(r.weights[n], ref.weights[n], rtol=0, atol=1e-12,
                                   err_msg=n)


def test_the_train_command_writes_an_ensemble(tmp_path):
    out = tmp_path / "ens"
    argv = ["--preset", "none", "--seed", "2", "--width", "16", "--epochs", "60",
            "--ensemble", "3", "--device", "cpu", "--no-progress"]
    assert train.main(argv + ["--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["ensemble"] == 3 and len(m["members"]) == 3
    for member in m["members"]:
        assert len(member["loss_history"]) == 60
        assert set(member["final"]) == set(m["final"]) and set(member["test"]) == set(m["test"])
    np.testing.assert_allclose(m["loss_history"],
                               np.mean([k["loss_history"] for k in m["members"]], axis=0))
    w = interchange.read(str(out / "weights.safetensors"))
    assert w["layers.0.weight"].shape == (3, 16, 1)
    _, width, depth, _, members = interchange.read_model(str(out / "weights.safetensors"))
    assert (width, depth, members) == (16, 2, 3)
    # the run's mixture, evaluated again from its stacked file, in the same framework
    ev = tmp_path / "ev"
    assert evaluate.main(["--weights", str(out / "weights.safetensors"), "--preset", "none",
                          "--seed", "2", "--device", "cpu", "--out", str(ev)]) == 0
    a = outputs.read_predictions(str(out / "predictions.csv"))
    b = outputs.read_predictions(str(ev / "predictions.csv"))
    for k in ("mu", "sigma"):  # vmapped members against one member at a time: float32
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6)
    # beyond the data: the figure, and member 0's sigma there recomputed from its weights
    assert (out / "extrapolation.png").exists() and (out / "extrapolation.svg").exists()
    beyond = m["beyond_the_data"]
    lo, hi = beyond["data_range"]
    grid = np.linspace(*beyond["x_range"], train.GRID_POINTS)
    assert grid[0] < lo and grid[-1] > hi and beyond["points_beyond"] == int(
        ((grid < lo) | (grid > hi)).sum())
    member0 = {n: a[0] for n, a in w.items()}
    _, var, _ = registry.backend("jax").predict(member0, grid.astype("float32")[:, None], "cpu")
    sd = np.sqrt(var[:, 0].astype(np.float64))[(grid < lo) | (grid > hi)]
    np.testing.assert_allclose(beyond["member_0"]["mean_sigma"], sd.mean(), rtol=1e-6)
    assert 0 <= beyond["mixture"]["true_mean_within_2sigma"] <= 1
    # the stacked initial weights start the same ensemble again
    again = tmp_path / "again"
    assert train.main(argv + ["--init-from", str(out / "initial_weights.safetensors"),
                              "--out", str(again)]) == 0
    assert json.loads((again / "metrics.json").read_text())["loss_history"] == m["loss_history"]


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_a_diverging_member_is_named(framework, tmp_path, capsys):
    argv = ["--framework", framework, "--preset", "none", "--width", "8", "--epochs", "30",
            "--lr", "1e6", "--ensemble", "2", "--device", "cpu", "--no-progress",
            "--out", str(tmp_path / "x")]
    assert train.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "member" in err and "epoch" in err and "\n" not in err
    assert not (tmp_path / "x").exists()


def test_ensemble_refusals(tmp_path, capsys):
    base = ["--preset", "none", "--width", "4", "--epochs", "3", "--n-points", "10",
            "--device", "cpu", "--no-progress"]
    cases = [(["--ensemble", "0"], "--ensemble"), (["--ensemble", "-2"], "--ensemble"),
             (["--ensemble", "5000"], "at most"),
             (["--ensemble", "2", "--loop", "step"], "--loop step"),
             (["--ensemble", "4000", "--width", "4096", "--n-points", "100000"], "members"),
             (["--ensemble", "2", "--seed", str(2**32 - 1)], "--seed")]
    for extra, needle in cases:
        out = tmp_path / "o"
        assert train.main(base + extra + ["--out", str(out)]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and needle in err and "\n" not in err, (extra, err)
        assert not out.exists()
    single = tmp_path / "one.safetensors"
    interchange.write(str(single), registry.backend("jax").init_weights(4, 2, "float32", 0))
    assert train.main(base + ["--ensemble", "2", "--init-from", str(single),
                              "--out", str(tmp_path / "o")]) == 2
    assert "leading member axis of 2" in capsys.readouterr().err


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_an_ensemble_resumes_to_the_uninterrupted_result(framework, tmp_path, monkeypatch):
    """A checkpoint taken mid-run (epoch 10 of 20) continues to the uninterrupted run's
    results, bit for bit: every member's losses, the stacked weights and optimiser state."""
    from hetcore import checkpoint

    full, cut = tmp_path / "full", tmp_path / "cut"
    cut.mkdir()
    save = checkpoint.save

    def save_and_keep(path, ckpt):
        save(path, ckpt)
        if ckpt.epoch == 10:
            save(str(cut / checkpoint.filename(framework)), ckpt)

    monkeypatch.setattr(checkpoint, "save", save_and_keep)
    argv = ["--framework", framework, "--preset", "none", "--seed", "3", "--width", "8",
            "--epochs", "20", "--ensemble", "3", "--optimizer", "adam", "--batch-size", "128",
            "--checkpoint-every", "5", "--device", "cpu", "--no-progress"]
    assert train.main(argv + ["--out", str(full)]) == 0
    monkeypatch.setattr(checkpoint, "save", save)
    assert checkpoint.load(str(cut / checkpoint.filename(framework))).epoch == 10
    assert train.main(["--resume", str(cut), "--no-progress"]) == 0
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (full, cut))
    assert b["config"]["resumed_from_epoch"] == {framework: 10}
    assert a["loss_history"] == b["loss_history"] and a["members"] == b["members"]
    assert a["held_out"] == b["held_out"]
    wa, wb = (interchange.read(str(d / "weights.safetensors")) for d in (full, cut))
    for n in wa:
        np.testing.assert_array_equal(wa[n], wb[n])


def test_vmapped_float32_members_take_full_precision_ynnpack_products():
    """JAX's vmapped float32 members on a CPU are compiled with YNNPACK's batched products
    (jaxhet.ensemble.YNN_DOTS) where the installed XLA has them; they keep float32's full
    precision: after 5 epochs every member's losses and weights are within a few float32
    roundings of the same run in float64 (relative 2e-6; bf16 or TF32 products would be
    1e-3 and 5e-4 away)."""
    from hetcore.backend import EngineOptions
    from jaxhet.ensemble import JaxEnsembleEngine, compiler_options

    backend = registry.backend("jax")
    s = Settings(framework="jax", preset="none", seed=1, width=64, depth=2, n_points=200,
                 epochs=5, dtype="float32", device="cpu", ensemble=4)
    ds = data.for_settings(s)
    x, y = ds.columns("float32")
    w, _ = driver.initial_weights(s, backend)
    engine = JaxEnsembleEngine(s, x, y, w, options=EngineOptions(members="vmap"))
    cpu = engine.x.devices().pop()
    assert compiler_options("float32", "vmap", cpu) is not None
    assert compiler_options("float32", "map", cpu) is None
    assert compiler_options("float64", "vmap", cpu) is None
    text = engine.chunk.as_text()
    if "ynn" not in text:
        pytest.skip("this XLA has no YNNPACK dot fusion: the program kept Eigen's products")
    r32 = driver.train(backend, s, x, y, w)
    x64, y64 = ds.columns("float64")
    r64 = driver.train(backend, s.replace(dtype="float64"), x64, y64,
                       interchange.cast(w, "float64"))
    np.testing.assert_allclose(r32.member_losses, r64.member_losses, rtol=2e-6)
    for n in w:
        scale = np.max(np.abs(r64.weights[n]))
        assert np.max(np.abs(r32.weights[n] - r64.weights[n])) <= 2e-6 * scale, n
