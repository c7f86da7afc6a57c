"""The training recipes in each framework against the independent float64 reference
(tests/reference.py, written from the laws): every loss, optimiser, schedule and batch
order; the full batch that is the lecture's run bit for bit; resume with optimiser state;
divergence naming the batch; and the recipes' settings."""

import numpy as np
import pytest

import jaxhet.backend as jb
import torchhet.backend as tb
from hetcore import checkpoint, data, driver, interchange
from hetcore.errors import TrainingDiverged, UsageError
from hetcore.settings import RECIPES, Settings
from tests import reference

FRAMEWORKS = [jb, tb]
VAR_HEAD = ("var_head.weight", "var_head.bias")

# name -> (Settings options, reference options). Small enough to be quick, long enough
# (25 epochs; 100 updates in batches of 12 of 40 points) for a wrong law to show.
CASES = {
    "sgd": (dict(), dict()),
    "momentum": (dict(momentum=0.9), dict(optimizer=reference.Optimizer("sgd", 0.9))),
    "nesterov": (dict(momentum=0.8, nesterov=True),
                 dict(optimizer=reference.Optimizer("sgd", 0.8, True))),
    "adam": (dict(optimizer="adam", lr=0.01), dict(optimizer=reference.Optimizer("adam"))),
    "adamw": (dict(optimizer="adamw", lr=0.01, weight_decay=0.05),
              dict(optimizer=reference.Optimizer("adamw", weight_decay=0.05))),
    "warmup-cosine": (dict(optimizer="adam", lr=0.01, schedule="cosine", warmup_steps=7,
                           lr_end=0.001),
                      dict(optimizer=reference.Optimizer("adam"), schedule="cosine",
                           warmup=7, lr_end=0.001)),
    "warmup-constant": (dict(warmup_steps=5), dict(warmup=5)),
    "beta-nll": (dict(loss="beta-nll", beta=0.5), dict(kind="beta-nll", beta=0.5)),
    "beta-nll-full": (dict(loss="beta-nll", beta=0.7, full=True, optimizer="adam", lr=0.01),
                      dict(kind="beta-nll", beta=0.7, full=True,
                           optimizer=reference.Optimizer("adam"))),
    "mse-adamw": (dict(loss="mse", optimizer="adamw", lr=0.01, weight_decay=0.1),
                  dict(kind="mse", optimizer=reference.Optimizer("adamw", weight_decay=0.1,
                                                                 frozen=VAR_HEAD))),
}


@pytest.fixture(scope="module")
def problem():
    # nn.Linear's initial law, as a run draws it: a problem as well conditioned as the
    # lecture's (weights 10 times larger make a loss of 13 and SGD with momentum amplify
    # rounding to 1e-10 within 100 updates, which says nothing of the laws)
    x, y = data.synthetic(40, 5).columns("float64")
    return interchange.draw_initial(16, 2, "float64", seed=3), x, y


@pytest.mark.parametrize("batch", [None, 12], ids=["full", "batch12"])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("fw", FRAMEWORKS, ids=["jax", "torch"])
def test_each_recipe_follows_the_float64_reference(fw, case, batch, problem):
    # Only rounding separates the frameworks from the laws (about 1e-15 here); 1e-10 is
    # the target, and anything wrong in a law (a bias correction, the buffer's first step,
    # the schedule's count, a batch out of order) is far above it.
    state, x, y = problem
    ours, theirs = CASES[case]
    theirs = {**theirs, "optimizer": _fresh(theirs.get("optimizer"))}
    s = Settings(framework=fw.NAME, device="cpu", preset="none", width=16, n_points=40,
                 dtype="float64", epochs=25, lr=ours.pop("lr", 0.05), batch_size=batch,
                 shuffle_seed=4, chunk_epochs=6, **ours)
    r = driver.train(fw, s, x, y, state)
    history, final = reference.train(state, x, y, s.lr, s.epochs, batch_size=batch,
                                     shuffle_seed=4, **theirs)
    np.testing.assert_allclose(r.loss_history, history, rtol=0, atol=1e-10)
    for n in final:
        np.testing.assert_allclose(r.weights[n], final[n], rtol=0, atol=1e-10, err_msg=n)
    if s.loss == "mse":  # the head never moved, and sigma is the residuals' RMS
        for n in VAR_HEAD:
            np.testing.assert_array_equal(r.weights[n], state[n])
        mu, _, _ = reference.forward(final, x)
        rms = np.sqrt(np.mean((y - mu) ** 2))
        np.testing.assert_allclose(r.sigma, np.full(40, rms), rtol=1e-10)


# torch's compile-update loop (whole updates traced into one graph, several a call) against
# the same reference: batches of 7 of 40 points are five whole batches and a shorter last
# one; at two updates a call (a run's sixteen would take the five in one) two calls of two,
# one of one, and the last batch (three graphs), the later epochs' calls through the guards
# that tell those graphs apart alone. (Its full batch, epochs four a call:
# tests/test_loops.py.)
COMPILED = {"adamw-cosine-beta-nll": (
                dict(optimizer="adamw", lr=0.01, weight_decay=0.05, schedule="cosine",
                     warmup_steps=7, lr_end=0.001, loss="beta-nll", beta=0.5),
                dict(optimizer=reference.Optimizer("adamw", weight_decay=0.05),
                     schedule="cosine", warmup=7, lr_end=0.001, kind="beta-nll", beta=0.5), 7),
            "mse-adamw": (*CASES["mse-adamw"], 7)}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(COMPILED))
def test_compile_update_follows_the_float64_reference(case, problem, monkeypatch):
    from torchhet import whole

    monkeypatch.setattr(whole, "CALL_BATCHES", 2)
    state, x, y = problem
    ours, theirs, batch = COMPILED[case]
    ours = dict(ours)
    theirs = {**theirs, "optimizer": _fresh(theirs.get("optimizer"))}
    s = Settings(framework="torch", device="cpu", preset="none", width=16, n_points=40,
                 dtype="float64", epochs=25, lr=ours.pop("lr", 0.05), batch_size=batch,
                 shuffle_seed=4, chunk_epochs=6, loop="compile-update", **ours)
    r = driver.train(tb, s, x, y, state)
    assert r.loop == "compile-update"
    history, final = reference.train(state, x, y, s.lr, s.epochs, batch_size=batch,
                                     shuffle_seed=4, **theirs)
    np.testing.assert_allclose(r.loss_history, history, rtol=0, atol=1e-10)
    for n in final:
        np.testing.assert_allclose(r.weights[n], final[n], rtol=0, atol=1e-10, err_msg=n)
    if s.loss == "mse":
        for n in VAR_HEAD:
            np.testing.assert_array_equal(r.weights[n], state[n])


def _fresh(opt):
    """A reference optimiser of the same law, without state (each test its own)."""
    if opt is None:
        return None
    return reference.Optimizer(opt.kind, opt.momentum, opt.nesterov, opt.wd, opt.betas,
                               opt.eps, opt.frozen)


@pytest.mark.parametrize("fw", FRAMEWORKS, ids=["jax", "torch"])
def test_a_batch_of_every_point_is_the_full_batch_bit_for_bit(fw):
    # B >= N: nothing permuted, one update per epoch: the lecture's run, bit for bit.
    x, y = data.lecture().columns("float32")
    w = interchange.lecture_weights()
    s = Settings(framework=fw.NAME, device="cpu", epochs=30)
    plain = driver.train(fw, s, x, y, w)
    for b in (500, 10**9):
        r = driver.train(fw, s.replace(batch_size=b, shuffle_seed=7), x, y, w)
        np.testing.assert_array_equal(r.loss_history, plain.loss_history)
        assert r.loop == plain.loop


@pytest.mark.parametrize("fw", FRAMEWORKS, ids=["jax", "torch"])
def test_a_mini_batch_epoch_visits_the_documented_order(fw, problem):
    # Epoch e's batches are consecutive slices of default_rng([S, e]).permutation(N), the
    # last one shorter (40 = 12 + 12 + 12 + 4), each batch's loss its own mean: written out
    # by hand for epoch 0; another shuffle seed changes the run.
    state, x, y = problem
    s = Settings(framework=fw.NAME, device="cpu", preset="none", width=16, n_points=40,
                 dtype="float64", epochs=1, lr=0.05, batch_size=12, shuffle_seed=9)
    r = driver.train(fw, s, x, y, state)
    order = np.random.default_rng([9, 0]).permutation(40)
    batches = [order[i:i + 12] for i in range(0, 40, 12)]
    assert [len(b) for b in batches] == [12, 12, 12, 4]
    manual = {n: a.copy() for n, a in state.items()}
    total = 0.0
    for idx in batches:
        value, g = reference.loss_and_grad(manual, x[idx], y[idx])
        total += value * len(idx)
        manual = {n: manual[n] - 0.05 * g[n] for n in manual}
    np.testing.assert_allclose(r.loss_history[0], total / 40, rtol=1e-13)
    for n in manual:
        np.testing.assert_allclose(r.weights[n], manual[n], rtol=0, atol=1e-13)
    other = driver.train(fw, s.replace(shuffle_seed=10), x, y, state)
    assert not np.allclose(other.weights["mean_head.bias"], r.weights["mean_head.bias"])


@pytest.mark.parametrize("fw,loop", [(jb, "auto"), (tb, "auto"),
                                     pytest.param(tb, "compile-update", marks=pytest.mark.slow)],
                         ids=["jax", "torch", "torch-compile-update"])
def test_resume_with_batches_and_adam_is_bit_for_bit(fw, loop, problem, tmp_path,
                                                      monkeypatch):
    # A run cut at its first checkpoint (epoch 8 of 20: Adam's moments and step count,
    # the schedule's position, the batch order of the epochs to come) and resumed from it
    # ends as the uninterrupted run, bit for bit.
    state, x, y = problem
    s = Settings(framework=fw.NAME, device="cpu", preset="none", width=16, n_points=40,
                 dtype="float32", epochs=20, optimizer="adam", lr=0.01, schedule="cosine",
                 warmup_steps=6, batch_size=12, shuffle_seed=2, chunk_epochs=3,
                 checkpoint_every=8, loop=loop)
    x, y, state = x.astype("float32"), y.astype("float32"), interchange.cast(state, "float32")
    whole = driver.train(fw, s, x, y, state)
    saved, real = [], checkpoint.save

    def keep_copies(path, ckpt):
        real(path, ckpt)
        saved.append(checkpoint.load(path))

    monkeypatch.setattr(checkpoint, "save", keep_copies)
    path = str(tmp_path / checkpoint.filename(fw.NAME))
    driver.train(fw, s, x, y, state, checkpoint_path=path)
    first = saved[0]
    assert first.epoch == 8 and (first.optimizer or fw is tb)
    if fw is tb:  # torch.optim's Adam state: step, exp_avg, exp_avg_sq of every parameter
        assert {k.rsplit(".", 1)[1] for k in first.optimizer} == {"step", "exp_avg",
                                                                    "exp_avg_sq"}
    resumed = driver.train(fw, s, x, y, state, resume=first)
    np.testing.assert_array_equal(resumed.loss_history, whole.loss_history)
    for n in state:
        np.testing.assert_array_equal(resumed.weights[n], whole.weights[n], err_msg=n)


@pytest.mark.parametrize("fw", FRAMEWORKS, ids=["jax", "torch"])
def test_divergence_names_the_epoch_and_batch(fw, problem):
    state, x, y = problem
    s = Settings(framework=fw.NAME, device="cpu", preset="none", width=16, n_points=40,
                 dtype="float32", epochs=30, lr=1e5, momentum=0.9, batch_size=12,
                 chunk_epochs=4, loop="auto")
    x, y, state = x.astype("float32"), y.astype("float32"), interchange.cast(state, "float32")
    with pytest.raises(TrainingDiverged) as info:
        driver.train(fw, s, x, y, state)
    e, b = info.value.epoch, info.value.batch
    assert f"epoch {e}, batch {b} of 4" in str(info.value), info.value
    # the updates before it were finite: a run that stops just before it finishes
    if e > 0:
        ok = driver.train(fw, s.replace(epochs=e), x, y, state)
        assert np.all(np.isfinite(ok.loss_history))


def test_both_frameworks_name_the_same_failed_batch(problem):
    state, x, y = problem
    s = Settings(device="cpu", preset="none", width=16, n_points=40, dtype="float64",
                 epochs=30, lr=3e3, batch_size=12, chunk_epochs=4)
    where = []
    for fw in FRAMEWORKS:
        with pytest.raises(TrainingDiverged) as info:
            driver.train(fw, s.replace(framework=fw.NAME), x, y, state)
        where.append((info.value.epoch, info.value.batch))
    assert where[0] == where[1], where


def test_recipes_fill_what_is_not_given_and_refuse_what_does_not_apply():
    c = Settings(recipe="calibrated")
    for name, value in RECIPES["calibrated"].items():
        assert getattr(c, name) == value, name
    assert Settings(recipe="calibrated", epochs=7).epochs == 7  # given overrides
    # a recipe default that does not apply to what is given is dropped
    assert Settings(recipe="calibrated", loss="nll").beta is None
    assert Settings(recipe="calibrated", schedule="constant").lr_end is None
    assert Settings(recipe="calibrated", optimizer="adam").weight_decay is None
    lecture = Settings()
    assert (lecture.loss, lecture.optimizer, lecture.momentum, lecture.schedule,
            lecture.batch_size, lecture.epochs, lecture.lr) == ("nll", "sgd", 0.0, "constant",
                                                                None, 500, 1e-3)
    for bad, needle in [(dict(optimizer="adam", momentum=0.5), "--momentum"),
                        (dict(beta=0.5), "--beta"), (dict(weight_decay=1e-4), "--weight-decay"),
                        (dict(optimizer="adam", weight_decay=1e-4), "--weight-decay"),
                        (dict(lr_end=1e-5), "--lr-end"), (dict(nesterov=True), "--nesterov"),
                        (dict(batch_size=0), "--batch-size"), (dict(loss="mse", full=True),
                                                               "--full")]:
        with pytest.raises(UsageError, match=needle):
            Settings(**bad)
    with pytest.raises(UsageError, match="--warmup-steps 600: longer than the run's 500"):
        Settings(warmup_steps=600).check_run(500)
    assert Settings(optimizer="adam").replace(optimizer="sgd").momentum == 0.0
