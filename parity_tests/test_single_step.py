"""Single-step quantities from shared weights: forward outputs, loss, every gradient, one
SGD step, in float64 and float32, from torch- and Flax-drawn weights, eager and compiled.

Bound (hetcore.criteria.SINGLE_STEP, reason stored beside it):
  float64: |jax - torch| <= 1e-12 * max(1, |value|max) per tensor. Rounding of the longest
    sum here (4096 terms) is ~sqrt(n)*u ~ 1e-14; ~10 compounding stages; x10 margin.
    Measured worst over these architectures: 9e-16.
  float32: 1e-5 * max(1, |value|max). sqrt(n)*u ~ 4e-6 for n = 2048; measured worst 2.6e-6
    (a bias gradient where one point's ReLU flipped), forward and loss <= 3.5e-7.
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxhet.backend as jb
import torchhet.backend as tb
from hetcore import criteria, data, driver, interchange
from parity_support import (COMPILES, DTYPES, INITS, dataset, evaluate, init_state,
                            single_step_checks)
from parity_support import settings as run_settings

VARIANTS = ("jax-jit", "jax-eager", "torch-eager", "torch-compiled")
PAIRS = [("jax-jit", "torch-eager"), ("jax-eager", "torch-eager"), ("jax-jit", "torch-compiled"),
         ("jax-eager", "torch-compiled")]


def lecture_inputs(init: str, dtype: str):
    """The lecture's data and architecture; weights: the lecture's own (drawn by torch) or
    drawn by Flax."""
    x, y = data.lecture().columns(dtype)
    if init == "torch":
        w = interchange.cast(interchange.lecture_weights(), dtype)
    else:
        w = init_state("flax", 512, 2, dtype, seed=10)
    return w, x, y


@pytest.mark.slow
@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_lecture_forward_loss_gradients(device, dtype, init):
    """Every JAX variant (jit, eager) against every torch variant (eager, torch.compile)."""
    w, x, y = lecture_inputs(init, dtype)
    out = {v: evaluate(v, w, x, y, device) for v in VARIANTS}
    checks = []
    for a, b in PAIRS:
        checks += single_step_checks(out[a], out[b], dtype, labels=(a, b))
    criteria.assert_checks(checks)
    assert dtype in COMPILES["dtypes"], "torch.compile compiled no graph of this dtype"


# width, depth, points, init: width 1 to 512, depth 1 to 4, from one point to 2000
SWEEP = [(1, 1, 1, "torch"), (1, 4, 7, "flax"), (3, 1, 50, "flax"), (8, 2, 64, "torch"),
         (64, 3, 200, "flax"), (512, 1, 3, "torch"), (512, 4, 2000, "flax")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width,depth,n,init", SWEEP)
def test_architectures(device, width, depth, n, init, dtype):
    w = init_state(init, width, depth, dtype, seed=width + depth)
    x, y = dataset(n, dtype, seed=n)
    a = evaluate("jax-jit", w, x, y, device)
    b = evaluate("torch-eager", w, x, y, device)
    criteria.assert_checks(single_step_checks(a, b, dtype))


@pytest.mark.slow
@settings(max_examples=8, deadline=None, derandomize=True)
@given(width=st.integers(1, 24), depth=st.integers(1, 4), n=st.integers(1, 40),
       seed=st.integers(0, 2**16), dtype=st.sampled_from(DTYPES),
       init=st.sampled_from(INITS + ("numpy",)), scale=st.sampled_from([0.1, 1.0, 3.0]))
def test_property_any_small_model(device, width, depth, n, seed, dtype, init, scale):
    """Random small architectures, data and weights, including weights drawn by numpy at
    several scales (large ones drive the variance head into softplus's linear branch)."""
    if init == "numpy":
        rng = np.random.default_rng(seed)
        w = {k: (scale * rng.standard_normal(s)).astype(dtype)
             for k, s in interchange.shapes(width, depth).items()}
    else:
        w = init_state(init, width, depth, dtype, seed)
    x, y = dataset(n, dtype, seed)
    a = evaluate("jax-jit", w, x, y, device)
    b = evaluate("torch-eager", w, x, y, device)
    criteria.assert_checks(single_step_checks(a, b, dtype))


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_loss_against_torch_gaussian_nll_loss(device, dtype, full):
    """JAX's loss equals torch.nn.GaussianNLLLoss on JAX's own mu and var (its clamp at
    eps = 1e-6 never acts: var >= 1e-6 by construction)."""
    w, x, y = lecture_inputs("flax", dtype)
    mu, var, loss = jb.predict(w, x, device, full, y)
    ref = torch.nn.GaussianNLLLoss(full=full, eps=1e-6, reduction="mean")(
        torch.tensor(mu), torch.tensor(y), torch.tensor(var))
    bound = criteria.SINGLE_STEP[dtype]
    checks = [criteria.check_close("loss vs GaussianNLLLoss", loss, float(ref), bound, dtype,
                                 ("jax", "GaussianNLLLoss"))]
    _, _, tloss = tb.predict(w, x, device, full, y)
    checks.append(criteria.check_close("torch loss vs GaussianNLLLoss", tloss, float(ref), bound,
                                     dtype, ("torch", "GaussianNLLLoss")))
    criteria.assert_checks(checks)


@pytest.mark.parametrize("loops,init", [(("scan", "eager"), "torch"), (("step", "optim"), "flax")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_one_sgd_step(device, dtype, loops, init):
    """One epoch of each framework's own training loop (JAX: the compiled scan or one jitted
    step; torch: the lecture's manual update or torch.optim.SGD) on the lecture's data and
    architecture."""
    w, x, y = lecture_inputs(init, dtype)
    s = run_settings(512, 2, dtype, epochs=1, lr=1e-3, device=device)
    a = driver.train(jb, s.replace(framework="jax", loop=loops[0]), x, y, w)
    b = driver.train(tb, s.replace(framework="torch", loop=loops[1]), x, y, w)
    bound = criteria.SINGLE_STEP[dtype]
    checks = criteria.check_states("one SGD step", a.weights, b.weights, bound, dtype)
    checks.append(criteria.check_close("loss of epoch 0", a.loss_history, b.loss_history, bound,
                                     dtype))
    checks.append(criteria.check_close("loss after the step", a.final_loss, b.final_loss, bound,
                                     dtype))
    criteria.assert_checks(checks)
