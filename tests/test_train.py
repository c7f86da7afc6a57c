"""Training in each framework: the lecture's trajectory, an independent reference, the
compiled loop's promises (one compile, chunking that changes nothing), and divergence."""

import jax
import numpy as np
import pytest

import jaxhet.backend as jb
import torchhet.backend as tb
from hetcore import data, driver, interchange
from hetcore.errors import TrainingDiverged
from hetcore.settings import Settings
from tests import reference

FRAMEWORKS = [jb, tb]


@pytest.fixture(scope="module")
def lecture_run():
    from tests.lecture_code import run_lecture

    return run_lecture(epochs=500)


def test_torchhet_reproduces_the_lecture_run_exactly(lecture_run):
    # Same data, weights, operations and order as the lecture's code: bit for bit.
    ds = data.lecture()
    x, y = ds.columns("float32")
    np.testing.assert_array_equal(x, lecture_run["x"].numpy())
    np.testing.assert_array_equal(y, lecture_run["y"].numpy())
    result = driver.train(tb, Settings(framework="torch", device="cpu", loop="eager"), x, y,
                          interchange.lecture_weights())
    np.testing.assert_array_equal(result.loss_history, np.float32(lecture_run["losses"]))
    for name, tensor in lecture_run["final"].items():
        np.testing.assert_array_equal(result.weights[name], tensor.numpy(), err_msg=name)


def test_no_autograd_follows_the_lecture_run_to_rounding(lecture_run):
    # torch's CPU default: the lecture's forward calls (epoch 0 bit for bit), its own
    # backward and update (measured: 6e-8 over the first 100 epochs, before the lecture's
    # SGD turns chaotic at ~250; a weight update fused into its product, addmm_, was off by
    # 5.6e-5 on an AVX2 machine: torchhet/handgrad.py).
    x, y = data.lecture().columns("float32")
    result = driver.train(tb, Settings(framework="torch", device="cpu", loop="no-autograd",
                                   epochs=100), x, y, interchange.lecture_weights())
    assert result.loss_history[0] == np.float32(lecture_run["losses"][0])
    np.testing.assert_allclose(result.loss_history, lecture_run["losses"][:100], rtol=0,
                               atol=1e-6)


def test_jaxhet_starts_the_lecture_run_where_the_lecture_does(lecture_run):
    # The first epochs sit far from the unstable regime: float32 rounding differences
    # between XLA and ATen kernels stay ~1e-7 (measured 2.4e-7 over 250 epochs).
    x, y = data.lecture().columns("float32")
    result = driver.train(jb, Settings(device="cpu", epochs=20), x, y, interchange.lecture_weights())
    np.testing.assert_allclose(result.loss_history, lecture_run["losses"][:20], rtol=0, atol=1e-6)
    assert result.loss_history[0] == pytest.approx(0.2584088444709778, abs=1e-6)


@pytest.mark.parametrize("fw", FRAMEWORKS, ids=["jax", "torch"])
def test_float64_trajectory_matches_the_numpy_reference(fw, small_state, small_data):
    # 30 float64 epochs of a small net: differences are accumulated rounding only.
    state = small_state(width=16, depth=2, dtype="float64")
    x, y = small_data(n=50, dtype="float64")
    settings = Settings(device="cpu", preset="none", epochs=30, lr=0.05, width=16, depth=2,
                        dtype="float64", chunk_epochs=7)
    result = driver.train(fw, settings, x, y, state)
    ref_hist, ref_final = reference.train(state, x, y, lr=0.05, epochs=30)
    np.testing.assert_allclose(result.loss_history, ref_hist, rtol=1e-11, atol=1e-12)
    for n in ref_final:
        np.testing.assert_allclose(result.weights[n], ref_final[n], rtol=1e-10, atol=1e-12,
                                   err_msg=n)
    mu, var, _ = reference.forward(ref_final, x)
    np.testing.assert_allclose(result.mu, mu[:, 0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(result.var, var[:, 0], rtol=1e-10, atol=1e-12)
    assert result.loss_history.dtype == np.float64
    assert all(a.dtype == np.float64 for a in result.weights.values())


@pytest.mark.parametrize("fw", FRAMEWORKS, ids=["jax", "torch"])
def test_chunk_length_changes_nothing(fw, small_state, small_data):
    # The masked tail of the last chunk must not move the weights: bit-identical runs.
    state = small_state(width=8, depth=2)
    x, y = small_data(n=30)
    runs = [driver.train(fw, Settings(device="cpu", preset="none", epochs=23, lr=0.02, width=8,
                              chunk_epochs=c), x, y, state) for c in (1, 5, 23, 100)]
    for r in runs[1:]:
        np.testing.assert_array_equal(r.loss_history, runs[0].loss_history)
        for n in state:
            np.testing.assert_array_equal(r.weights[n], runs[0].weights[n], err_msg=n)


def test_torch_optim_sgd_gives_the_lecture_update(small_state, small_data):
    # torch.optim.SGD computes p.add_(g, alpha=-lr), which ATen's CPU kernel may evaluate
    # as a fused multiply-add, one rounding instead of the lecture's two; float64 keeps that
    # difference at accumulated-rounding level.
    state = small_state(width=16, depth=2, dtype="float64")
    x, y = small_data(n=40, dtype="float64")
    s = Settings(framework="torch", device="cpu", preset="none", epochs=25, lr=0.05, width=16,
                 dtype="float64")
    manual = driver.train(tb, s.replace(loop="eager"), x, y, state)
    optim = driver.train(tb, s.replace(loop="optim"), x, y, state)
    np.testing.assert_allclose(optim.loss_history, manual.loss_history, rtol=1e-13, atol=1e-14)
    for n in state:
        np.testing.assert_allclose(optim.weights[n], manual.weights[n], rtol=1e-12, atol=1e-14,
                                   err_msg=n)


def test_jax_compiles_once_for_new_data_and_weights(small_state, small_data):
    compiles = []

    def listen(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    s = Settings(device="cpu", preset="none", epochs=12, width=8, chunk_epochs=5)
    x, y = small_data(n=24)
    driver.train(jb, s, x, y, small_state(width=8))  # warm: compiles what it must
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        x2, y2 = small_data(n=24, seed=9)
        r = driver.train(jb, s.replace(lr=0.5), x2, y2, small_state(width=8, seed=4))
        assert compiles == [], f"recompiled {len(compiles)} times for new values"
        driver.train(jb, s.replace(width=9), x, y, small_state(width=9))
        assert compiles, "a new architecture must compile (the listener works)"
    finally:
        jax.monitoring.clear_event_listeners()
    assert np.all(np.isfinite(r.loss_history))


@pytest.mark.parametrize("fw", FRAMEWORKS, ids=["jax", "torch"])
def test_divergence_names_the_first_bad_epoch(fw, small_state, small_data):
    state = small_state(width=8, depth=2)
    x, y = small_data(n=30)
    s = Settings(device="cpu", preset="none", epochs=40, width=8, chunk_epochs=6)
    with pytest.raises(TrainingDiverged) as info:
        driver.train(fw, s.replace(lr=1e6), x, y, state)
    epoch = info.value.epoch
    # The epochs before the named one were finite: replay them with a finite run.
    if epoch > 0:
        ok = driver.train(fw, s.replace(lr=1e6, epochs=epoch), x, y, state)
        assert np.all(np.isfinite(ok.loss_history))
    assert f"epoch {epoch}" in str(info.value)


def test_float32_and_float64_runs_agree_early():
    # The lecture run in float64 starts from the same (float32-exact) weights: the first
    # epochs agree with float32 to float32 rounding.
    ds = data.lecture()
    w = interchange.lecture_weights()
    r32 = driver.train(jb, Settings(device="cpu", epochs=5), *ds.columns("float32"), w)
    r64 = driver.train(jb, Settings(device="cpu", epochs=5, dtype="float64"), *ds.columns("float64"),
                       interchange.cast(w, "float64"))
    assert r64.loss_history.dtype == np.float64
    np.testing.assert_allclose(r32.loss_history, r64.loss_history, rtol=0, atol=1e-6)


@pytest.mark.parametrize("fw,loops", [(jb, ("scan", "step")), (tb, ("eager", "optim"))],
                         ids=["jax", "torch"])
def test_every_loop_trains_the_same_run(fw, loops, small_state, small_data):
    # Float64 so that a loop that differs only in rounding (optim's fused update) agrees to
    # accumulated rounding, while a wrong loop (a skipped or doubled epoch) is far off.
    state = small_state(width=8, depth=2, dtype="float64")
    x, y = small_data(n=30, dtype="float64")
    s = Settings(framework=fw.NAME, device="cpu", preset="none", epochs=17, lr=0.05,
                 width=8, dtype="float64", chunk_epochs=5)
    runs = [driver.train(fw, s.replace(loop=loop), x, y, state) for loop in loops]
    for loop, r in zip(loops, runs):
        assert r.loop == loop
        np.testing.assert_allclose(r.loss_history, runs[0].loss_history, rtol=1e-13, atol=1e-14)
        for n in state:
            np.testing.assert_allclose(r.weights[n], runs[0].weights[n], rtol=1e-12, atol=1e-14)


def _torch_run_that_blows_up(small_state, small_data, monkeypatch, poison, loop="eager"):
    """A small torch run (12 epochs in chunks of 4) whose runner calls `poison(n, losses)`
    after each of its calls; `poison` returns True to make a weight infinite there (an
    update that leaves the loss finite). Returns (run, the clean run's losses)."""
    import torch

    import torchhet.engine

    state = small_state(width=8, depth=1)
    x, y = small_data(n=20)
    s = Settings(framework="torch", device="cpu", preset="none", epochs=12, lr=0.01, width=8,
                 depth=1, chunk_epochs=5, loop=loop)
    clean = driver.train(tb, s, x, y, state).loss_history
    real = torchhet.engine.make_runner

    def make_runner(loop, model, *args, **kwargs):
        runner = real(loop, model, *args, **kwargs)
        inner = runner.run

        def run(n, losses, start):
            inner(n, losses, start)
            if poison(n, losses, clean):
                with torch.no_grad():
                    model.var_head.weight[0, 0] = float("inf")

        runner.run = run
        return runner

    monkeypatch.setattr(torchhet.engine, "make_runner", make_runner)
    return lambda: driver.train(tb, s, x, y, state)


@pytest.mark.parametrize("loop", ["eager", "no-autograd"])
def test_torch_names_the_update_that_made_weights_nonfinite(small_state, small_data,
                                                            monkeypatch, loop):
    # An update that leaves the loss finite but a weight infinite (here injected after the
    # last epoch of a chunk, which no later loss of the chunk can reveal): the chunk is
    # replayed from its start, epoch by epoch, and the run stops naming that epoch.
    def at_epoch_3(n, losses, clean):  # the same epoch on replay, by its loss
        return losses[n - 1].item() == clean[3]

    run = _torch_run_that_blows_up(small_state, small_data, monkeypatch, at_epoch_3, loop)
    with pytest.raises(TrainingDiverged) as info:
        run()
    assert info.value.epoch == 3  # chunks of 4 epochs: 12 = 3 x 4; epoch 3 ends the first
    assert "update of epoch 3" in str(info.value)


def test_torch_blowup_that_the_replay_does_not_repeat(small_state, small_data, monkeypatch):
    # A device whose replay of the chunk stays finite (nondeterminism): the run still stops
    # with the divergence error, at the chunk's last epoch, not with a TypeError.
    calls = []

    def first_call_only(n, losses, clean):
        calls.append(n)
        return len(calls) == 1

    run = _torch_run_that_blows_up(small_state, small_data, monkeypatch, first_call_only)
    with pytest.raises(TrainingDiverged) as info:
        run()
    assert info.value.epoch == 3 and "update of epoch 3" in str(info.value)
    assert calls == [4, 1, 1, 1, 1]  # the chunk, then its four epochs replayed one by one


def test_jax_names_the_update_that_made_weights_nonfinite(small_state, small_data, monkeypatch):
    # Mirror of the torch test: an update that leaves the loss finite but a weight infinite.
    # The compiled epoch refuses it, the weights stop there, and the run names that epoch.
    import jax.numpy as jnp
    import optax

    import jaxhet.engine

    state = small_state(width=8, depth=1)
    x, y = small_data(n=20)
    s = Settings(device="cpu", preset="none", epochs=12, lr=0.01, width=8, depth=1,
                 chunk_epochs=5)
    clean = driver.train(jb, s, x, y, state)
    # The weights entering epoch 6 of the clean run (after 6 updates) identify that epoch.
    marker = driver.train(jb, s.replace(epochs=6), x, y, state).weights["mean_head.bias"]
    real = optax.apply_updates

    def broken(params, updates):
        new = real(params, updates)
        hit = jnp.all(params["mean_head"]["bias"][...] == jnp.asarray(marker))
        kernel = new["var_head"]["kernel"]
        kernel[...] = jnp.where(hit, jnp.full_like(kernel[...], jnp.inf), kernel[...])
        return new

    monkeypatch.setattr(jaxhet.engine.optax, "apply_updates", broken)
    monkeypatch.setattr(jaxhet.engine, "_compiled", {})  # compile the broken epoch afresh
    jax.clear_caches()  # and trace it afresh: jit keeps the clean run's trace
    try:
        with pytest.raises(TrainingDiverged) as info:
            driver.train(jb, s, x, y, state)
    finally:  # no later test may reuse the broken trace
        monkeypatch.undo()
        jax.clear_caches()
    assert info.value.epoch == 6, info.value
    assert "update of epoch 6" in str(info.value)
    assert np.all(np.isfinite(clean.loss_history))


@pytest.mark.parametrize("loop", ["scan", "step"])
def test_jax_names_a_refused_update_among_equal_losses(small_state, small_data, monkeypatch,
                                                       loop):
    # An lr far below the weights' ulp leaves them unchanged: every loss is the same bit
    # for bit, before the failure and after it. The epoch is read from the compiled carry,
    # not guessed from where the losses start repeating (which would say epoch 0 here).
    import jax.numpy as jnp

    import jaxhet.engine

    state = small_state(width=8, depth=1)
    x, y = small_data(n=20)
    s = Settings(device="cpu", preset="none", epochs=12, lr=1e-30, width=8, depth=1,
                 chunk_epochs=5, loop=loop)
    real = jaxhet.engine.update
    real_runner, chunks = jaxhet.engine.make_runner, []

    def counting(*args, **kwargs):  # how many chunks run before the failure is named
        runner, compiled = real_runner(*args, **kwargs)
        return (lambda carry, n, start, orders: (chunks.append(start),
                                                 runner(carry, n, start, orders))[1],
                compiled)

    def broken(graphdef, cfg, carry, x, y, h, active, t):
        lr = jnp.where(t == 7, jnp.asarray(jnp.inf, h["lr"].dtype), h["lr"])  # update 7
        return real(graphdef, cfg, carry, x, y, {**h, "lr": lr}, active, t)

    monkeypatch.setattr(jaxhet.engine, "update", broken)
    monkeypatch.setattr(jaxhet.engine, "_compiled", {})
    monkeypatch.setattr(jaxhet.engine, "make_runner", counting)
    jax.clear_caches()
    try:
        with pytest.raises(TrainingDiverged) as info:
            driver.train(jb, s.replace(epochs=1000), x, y, state)
    finally:
        monkeypatch.undo()
        jax.clear_caches()
    assert info.value.epoch == 7 and "update of epoch 7" in str(info.value), info.value
    # Named when its chunk (epochs 5-9) is read, while the next one runs: not at the end.
    assert chunks == [0, 5, 10], chunks
    clean = driver.train(jb, s, x, y, state)
    assert len(set(clean.loss_history.tolist())) == 1  # the losses really are all equal


@pytest.mark.parametrize("fw", FRAMEWORKS, ids=["jax", "torch"])
def test_both_frameworks_name_the_same_epoch_for_a_weight_blowup(fw, small_state, small_data):
    # lr 3.4e38 with targets far off (gradients well above 1) sends a weight to inf in the
    # first update while that epoch's loss is finite: both frameworks must name that
    # update, not the non-finite loss that follows it.
    state = small_state(width=8, depth=1)
    x, y = small_data(n=20)
    y = y * 1000
    s = Settings(framework=fw.NAME, device="cpu", preset="none", epochs=20, lr=3.4e38,
                 width=8, depth=1, chunk_epochs=10)
    with pytest.raises(TrainingDiverged) as info:
        driver.train(fw, s, x, y, state)
    assert info.value.epoch == 0 and "update of epoch 0" in str(info.value), info.value
