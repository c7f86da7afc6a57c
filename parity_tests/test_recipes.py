"""The training recipes across the frameworks: every loss's single-step quantities, and
N-step trajectories with their fitted band for each loss x each optimiser x schedule x
full or mini-batch, from weights drawn by either framework.

The bounds are the lecture run's (hetcore.criteria): SINGLE_STEP for one step, the one-ulp
floor for trajectories (each framework's run against its twin started one ulp away), and
in float64 also a fixed 1e-10, the recipes' target (rounding alone moves these short runs
by about 1e-15; each framework is held to the laws themselves in tests/test_recipes.py).
"""

import itertools

import numpy as np
import pytest

import jaxhet.backend as jb
import torchhet.backend as tb
from hetcore import criteria, driver, interchange
from hetcore.settings import Settings
from parity_support import (DTYPES, INITS, dataset, floor_gaps, grid, init_state,
                            single_step_checks, train_pair, twin_pairs)

LOSSES = {"nll": {}, "beta-nll": dict(beta=0.5), "mse": {}}
OPTIMIZERS = {"momentum": dict(optimizer="sgd", momentum=0.9, lr=0.01),
              "adam": dict(optimizer="adam", lr=3e-3),
              "adamw": dict(optimizer="adamw", lr=3e-3, weight_decay=0.01)}
SCHEDULES = {"constant": {}, "warmup-cosine": dict(schedule="cosine", warmup_steps=10,
                                                   lr_end=1e-4)}
BATCHES = {"full": None, "batch16": 16}
FLOAT64_FIXED = 1e-10
COMBOS = list(itertools.product(LOSSES, OPTIMIZERS, SCHEDULES, BATCHES))


def _pairwise(combos: list) -> list:
    """Combinations in which every pair of ingredients (loss and optimiser, optimiser and
    schedule, ...) meets at least once: greedily, the one that covers most pairs still
    missing, in a fixed order."""
    def pairs(c):
        return {(i, c[i], j, c[j]) for i, j in itertools.combinations(range(len(c)), 2)}

    missing, chosen = set().union(*map(pairs, combos)), []
    while missing:
        best = max(combos, key=lambda c: len(pairs(c) & missing))
        chosen.append(best)
        missing -= pairs(best)
    return chosen


# float32: every combination; float64: every pair of ingredients once (each framework also
# meets the float64 laws themselves for every recipe: tests/test_recipes.py).
RUNS = [("float32", c) for c in COMBOS] + [("float64", c) for c in _pairwise(COMBOS)]


def _eval(module, state, x, y, device, loss, beta):
    mu, var, value = module.predict(state, x, device, False, y, loss, beta)
    value_g, grads = module.loss_and_grad(state, x, y, device, False, loss, beta)
    return {"mu": mu, "var": var, "loss": value, "loss_g": value_g, "grads": grads}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("loss,beta", [("beta-nll", 0.5), ("beta-nll", 0.0), ("beta-nll", 1.0),
                                       ("mse", None)])
def test_single_step_of_each_loss(device, dtype, init, loss, beta):
    # Forward outputs, the loss and every gradient under SINGLE_STEP (an MSE's variance
    # head: zero gradients in both).
    w = init_state(init, 24, 2, dtype, seed=5)
    x, y = dataset(80, dtype, seed=5)
    a, b = (_eval(m, w, x, y, device, loss, beta) for m in (jb, tb))
    criteria.assert_checks(single_step_checks(a, b, dtype))
    if loss == "mse":
        assert not any(np.any(a["grads"][n]) or np.any(b["grads"][n])
                       for n in ("var_head.weight", "var_head.bias"))
    if beta == 0.0:  # beta 0 is the NLL exactly
        nll = _eval(jb, w, x, y, device, "nll", None)
        assert nll["loss"] == a["loss"]


@pytest.mark.slow
@pytest.mark.parametrize("dtype,combo", RUNS, ids=[f"{d}-{'-'.join(c)}" for d, c in RUNS])
def test_recipe_trajectory_and_band(device, dtype, combo):
    loss, optimizer, schedule, batch = combo
    i = COMBOS.index((loss, optimizer, schedule, batch))
    init = INITS[i % 2]  # weights drawn by torch for half the combinations, flax the other
    w = init_state(init, 16, 2, dtype, seed=i)
    x, y = dataset(64, dtype, seed=i)
    s = Settings(framework="both", device=device, preset="none", width=16, depth=2,
                 n_points=64, dtype=dtype, epochs=30, chunk_epochs=11, loss=loss,
                 batch_size=BATCHES[batch], shuffle_seed=i, **LOSSES[loss],
                 **OPTIMIZERS[optimizer], **SCHEDULES[schedule])
    pair = train_pair(s, x, y, w, twins=1)
    fixed = FLOAT64_FIXED if dtype == "float64" else 0.0
    # float32: the float64 run from the same data and weights (cast exactly) judges a final
    # array that parts by more than the one-ulp nudge predicts (criteria.
    # REFERENCE_FALLBACK_REASON: per-update rounding of mini-batch and adaptive runs
    # differs between frameworks, and by how much depends on the CPU's kernels).
    ref = None
    if dtype == "float32":
        ref = driver.train(tb, s.replace(framework="torch", dtype="float64"),
                           x.astype("float64"), y.astype("float64"),
                           interchange.cast(w, "float64"))

    def judged(check, get):
        if ref is None:
            return check
        return criteria.final_reference_fallback(
            check, get(pair["jax"]), get(pair["torch"]), get(ref),
            [get(t) for t in pair["twins"]["jax"]], [get(t) for t in pair["twins"]["torch"]])

    check, _ = criteria.floor_check("loss per epoch", pair["jax"].loss_history,
                                    pair["torch"].loss_history, floor_gaps(pair), dtype,
                                    fixed=0.0)
    checks = [check]
    for name in w:
        checks.append(judged(criteria.final_floor_check(
            f"final {name}", pair["jax"].weights[name], pair["torch"].weights[name],
            twin_pairs(pair, lambda r: r.weights[name]), dtype), lambda r: r.weights[name]))
    xg = grid(201, dtype, -3.5, 3.5)
    mods = {"jax": jb, "torch": tb}

    def band(name, result):
        grid_x = xg if result.dtype == dtype else xg.astype(result.dtype)
        mu, var, _ = mods[name].predict(result.weights, grid_x, device)
        sigma = (np.full(len(xg), np.sqrt(np.mean(result.var.astype(np.float64))))
                 if loss == "mse" else np.sqrt(np.asarray(var, np.float64)[:, 0]))
        return np.asarray(mu, np.float64)[:, 0], sigma

    bands = {n: band(n, pair[n]) for n in mods}
    twins = [(bands[n], band(n, t)) for n in mods for t in pair["twins"][n]]
    cache = {}  # band of each result, by id

    def band_of(r, k):
        name = "torch" if r is ref else next(n for n in mods if r is pair[n]
                                             or any(r is t for t in pair["twins"][n]))
        return cache.setdefault(id(r), band(name, r))[k]

    for k, q in ((0, "mu"), (1, "sigma")):
        checks.append(judged(criteria.final_floor_check(
            f"{q} on the grid", bands["jax"][k], bands["torch"][k],
            [(a[k], b[k]) for a, b in twins], dtype), lambda r, k=k: band_of(r, k)))
    if fixed:
        checks.append(criteria.check_close(
            "loss per epoch (1e-10)", pair["jax"].loss_history, pair["torch"].loss_history,
            criteria.Bound(fixed, "the recipes' float64 target"), dtype))
        checks += criteria.check_states("final (1e-10)", pair["jax"].weights,
                                        pair["torch"].weights,
                                        criteria.Bound(fixed, "the recipes' float64 target"),
                                        dtype)
    criteria.assert_checks(checks)
    assert check.info["decorrelated_from"] is None  # a stable run: the tight phase throughout
