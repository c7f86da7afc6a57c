"""Model and loss in each framework, against each other and an independent numpy reference."""

import math

import numpy as np
import pytest
import torch

import jaxhet.backend as jb
import torchhet.backend as tb
from hetcore.interchange import names, shapes
from jaxhet.device import enable_x64
from tests import reference

FRAMEWORKS = [jb, tb]


@pytest.mark.parametrize("width,depth", [(1, 1), (8, 2), (16, 3)])
@pytest.mark.parametrize("fw", FRAMEWORKS, ids=["jax", "torch"])
def test_parameters_are_the_interchange_names_and_shapes(fw, width, depth):
    state = fw.init_weights(width, depth, "float32", seed=3)
    assert list(state) == names(depth)
    assert {n: a.shape for n, a in state.items()} == shapes(width, depth)
    assert all(a.dtype == np.float32 for a in state.values())


@pytest.mark.parametrize("fw", FRAMEWORKS, ids=["jax", "torch"])
def test_init_follows_torch_default_law(fw):
    # U(-1/sqrt(fan_in), 1/sqrt(fan_in)): bounded, and spread like a uniform (var = b^2/3).
    w = fw.init_weights(256, 2, "float64", seed=0)["layers.2.weight"]
    bound = 1 / math.sqrt(256)
    assert np.abs(w).max() <= bound
    assert abs(w.var() / (bound ** 2 / 3) - 1) < 0.02  # 65536 draws: sd of the ratio ~0.005
    assert abs(w.mean()) < 4 * bound / math.sqrt(3 * w.size)


@pytest.mark.parametrize("fw", FRAMEWORKS, ids=["jax", "torch"])
def test_init_is_a_function_of_the_seed(fw):
    a, b, c = (fw.init_weights(8, 2, "float32", seed=s) for s in (1, 1, 2))
    assert all(np.array_equal(a[n], b[n]) for n in a)
    assert not np.array_equal(a["layers.2.weight"], c["layers.2.weight"])


@pytest.mark.parametrize("fw", FRAMEWORKS, ids=["jax", "torch"])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_forward_and_gradients_match_reference_float64(fw, depth, small_state, small_data):
    # float64 from identical inputs: only rounding differs, ~1e-16 relative per operation.
    state = small_state(width=16, depth=depth, dtype="float64")
    x, y = small_data(n=40, dtype="float64")
    mu_ref, var_ref, _ = reference.forward(state, x)
    mu, var, loss = fw.predict(state, x, device="cpu", y=y)
    np.testing.assert_allclose(mu, mu_ref, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(var, var_ref, rtol=1e-12, atol=1e-13)
    ref_loss, ref_grads = reference.loss_and_grad(state, x, y)
    assert loss == pytest.approx(ref_loss, rel=1e-12, abs=1e-13)
    value, grads = fw.loss_and_grad(state, x, y, device="cpu")
    assert value == pytest.approx(ref_loss, rel=1e-12, abs=1e-13)
    for n in ref_grads:
        np.testing.assert_allclose(grads[n], ref_grads[n], rtol=1e-9, atol=1e-12, err_msg=n)


def test_variance_head_is_softplus_plus_eps(small_state, small_data):
    # A very negative variance-head bias drives softplus to 0: var must still be eps.
    state = small_state(width=4, depth=1, dtype="float64")
    state["var_head.bias"] = np.array([-800.0])
    x, _ = small_data(n=8, dtype="float64")
    for fw in FRAMEWORKS:
        _, var, _ = fw.predict(state, x, device="cpu")
        np.testing.assert_array_equal(var, 1e-6)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_softplus_mirrors_torch_forward_and_backward(dtype):
    import jax
    import jax.numpy as jnp

    from jaxhet.model import softplus

    enable_x64(dtype)
    z = np.array([-100, -20.5, -3, -1e-3, 0, 1e-3, 2.5, 19.99, 20, 20.001, 35, 100], dtype=dtype)
    jz = jnp.asarray(z)
    j_val, j_grad = np.asarray(softplus(jz)), np.asarray(jax.grad(lambda v: softplus(v).sum())(jz))
    tz = torch.tensor(z, requires_grad=True)
    t_val = torch.nn.functional.softplus(tz)
    t_val.sum().backward()
    # Same formulas on both sides; exp/log1p kernels may differ by an ulp or two.
    # XLA on CPU flushes subnormals to zero (softplus(-100) = 3.8e-44 in torch, 0 here), so
    # values below the smallest normal number compare absolutely.
    ulp, tiny = float(np.finfo(dtype).eps), float(np.finfo(dtype).tiny)
    np.testing.assert_allclose(j_val, t_val.detach().numpy(), rtol=4 * ulp, atol=tiny)
    np.testing.assert_allclose(j_grad, tz.grad.numpy(), rtol=4 * ulp, atol=tiny)
    assert np.all(np.isfinite(j_grad))


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_loss_equals_torch_gaussian_nll_loss(full, dtype):
    import jax.numpy as jnp

    from jaxhet.model import gaussian_nll as jax_nll
    from torchhet.model import gaussian_nll as torch_nll

    enable_x64(dtype)
    rng = np.random.default_rng(0)
    mu, y = rng.standard_normal((2, 300, 1)).astype(dtype)
    var = (rng.random((300, 1)) + 1e-3).astype(dtype)
    expected = torch.nn.GaussianNLLLoss(full=full, eps=1e-6)(
        torch.from_numpy(mu), torch.from_numpy(y), torch.from_numpy(var)).item()
    ours_torch = torch_nll(torch.from_numpy(mu), torch.from_numpy(var), torch.from_numpy(y), full).item()
    ours_jax = float(jax_nll(jnp.asarray(mu), jnp.asarray(var), jnp.asarray(y), full))
    # GaussianNLLLoss writes 0.5*(log v + d^2/v); ours log(v)/2 + d^2/(2v): a few ulps apart.
    rtol = 32 * float(np.finfo(dtype).eps)
    assert ours_torch == pytest.approx(expected, rel=rtol)
    assert ours_jax == pytest.approx(expected, rel=rtol)


@pytest.mark.parametrize("depth", [2, 3])
def test_paired_forward_is_the_models_and_its_gradient_autodiffs(depth):
    """model.paired (the first two layers as first_pair, whose backward recomputes h1 in
    the transposed layout: what a JAX ensemble on a CPU trains with) gives the model's own
    forward bit for bit, and in float64 the gradient of plain autodiff within 1e-13 (the
    second layer's weight gradient is summed in another order)."""
    import jax
    from flax import nnx

    from hetcore import interchange
    from jaxhet.engine import loss_fn
    from jaxhet.weights import put

    enable_x64("float64")
    state = interchange.draw_initial(16, depth, "float64", 4)
    graphdef, params = put(state, "float64", jax.devices("cpu")[0])
    rng = np.random.default_rng(0)
    x = rng.uniform(-3, 3, (40, 1))
    y = np.sin(x) + 0.1 * rng.standard_normal((40, 1))
    model = nnx.merge(graphdef, params)
    for a, b in zip(model(x), model.paired(x)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    plain = jax.grad(loss_fn)(params, graphdef, x, y, False, False, "nll", None, False)
    paired = jax.grad(loss_fn)(params, graphdef, x, y, False, False, "nll", None, True)
    for g, h in zip(jax.tree.leaves(plain), jax.tree.leaves(paired)):
        np.testing.assert_allclose(np.asarray(h), np.asarray(g), rtol=0, atol=1e-13)
    # the input's cotangent too, though training never asks for it
    dx = [jax.grad(lambda x: jax.numpy.sum(f(x)[0]))(x) for f in (model, model.paired)]
    np.testing.assert_allclose(np.asarray(dx[1]), np.asarray(dx[0]), rtol=0, atol=1e-13)


@pytest.mark.parametrize("depth,features", [(1, 1), (2, 1), (3, 1), (2, 3)])
def test_lean_forward_is_the_models_with_its_gradient(depth, features):
    """torchhet.model.lean_forward (the first layer element-wise when there is one input,
    the heads as one product: what compile-update traces) gives the model's mu and var
    and, in float64, the loss's gradient of every weight within 1e-13 of autograd through
    the model itself (sums in another order)."""
    from torch.func import functional_call, grad

    from torchhet.model import HeteroscedasticMLP, lean_forward, training_loss

    torch.manual_seed(4)
    model = HeteroscedasticMLP(16, depth, dtype=torch.float64, in_features=features)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.uniform(-3, 3, (40, features)))
    y = torch.sin(x[:, :1]) + 0.1 * torch.from_numpy(rng.standard_normal((40, 1)))
    weights = {n: p.detach() for n, p in model.named_parameters()}
    for a, b in zip(model(x), lean_forward(weights, x)):
        np.testing.assert_allclose(b.detach().numpy(), a.detach().numpy(), rtol=1e-14,
                                   atol=1e-15)

    def loss(w, f):
        return training_loss("beta-nll", *f(w), y, False, 0.5)

    ours = grad(loss)(weights, lambda w: lean_forward(w, x))
    theirs = grad(loss)(weights, lambda w: functional_call(model, w, (x,)))
    assert ours.keys() == theirs.keys() == weights.keys()
    for n in weights:
        np.testing.assert_allclose(ours[n].numpy(), theirs[n].numpy(), rtol=0, atol=1e-13,
                                   err_msg=n)
