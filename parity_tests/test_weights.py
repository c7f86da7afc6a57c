"""Shared initial weights in both directions, in memory and through the interchange file.

A round trip must reproduce every tensor bit for bit: no tolerance here.
"""

import ast
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jaxhet.weights as jw
from jaxhet.device import enable_x64
import torchhet.weights as tw
from hetcore import interchange
from hetcore.errors import UsageError
from jaxhet.model import HeteroscedasticMLP as JaxMLP
from parity_support import DTYPES, INITS, init_state
from torchhet.model import HeteroscedasticMLP as TorchMLP

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = [(512, 2), (1, 1), (7, 3), (16, 4)]  # the lecture's, then others


def same_bits(a: dict, b: dict) -> list[str]:
    """Names of tensors that differ in name, dtype, shape or any bit."""
    bad = sorted(set(a) ^ set(b))
    for n in set(a) & set(b):
        x, y = np.asarray(a[n]), np.asarray(b[n])
        if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            bad.append(n)
    return bad


def flax_params(state: dict, dtype: str):
    enable_x64(dtype)  # float64 parameters need JAX's x64 mode
    width, depth = interchange.architecture(state)
    model = nnx.eval_shape(lambda: JaxMLP(width, depth, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0)))
    return jw.from_state_dict(state, nnx.state(model, nnx.Param))


def torch_module(state: dict, dtype: str) -> TorchMLP:
    width, depth = interchange.architecture(state)
    torch_dtype = {"float32": torch.float32, "float64": torch.float64}[dtype]
    model = TorchMLP(width, depth, dtype=torch_dtype)
    return tw.from_state_dict(state, model)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("width,depth", ARCHS)
def test_round_trip_in_memory_both_directions(init, width, depth, dtype):
    state = init_state(init, width, depth, dtype, seed=3)
    interchange.check(state, width, depth, dtype)  # names, shapes, dtype, finite
    # into Flax and back; into torch and back; across: Flax -> torch -> Flax
    via_flax = jw.to_state_dict(flax_params(state, dtype))
    via_torch = tw.to_state_dict(torch_module(state, dtype))
    across = jw.to_state_dict(flax_params(tw.to_state_dict(torch_module(via_flax, dtype)), dtype))
    for label, back in (("flax", via_flax), ("torch", via_torch), ("flax-torch-flax", across)):
        bad = same_bits(state, back)
        assert bad == [], f"{init} weights through {label}: {bad}"
    assert list(via_flax) == interchange.names(depth) == list(via_torch)  # module order


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("init", INITS)
def test_round_trip_through_the_file(tmp_path, init, dtype):
    """Written by one side, read by the other, by a plain torch module (strict=True) and
    back: bit for bit."""
    state = init_state(init, 16, 2, dtype, seed=5)
    path = str(tmp_path / "w.safetensors")
    if init == "flax":  # Flax writes, torch reads
        interchange.write(path, jw.to_state_dict(flax_params(state, dtype)))
        back = tw.to_state_dict(torch_module(interchange.read(path), dtype))
    else:  # torch writes, Flax reads
        interchange.write(path, tw.to_state_dict(torch_module(state, dtype)))
        back = jw.to_state_dict(flax_params(interchange.read_weights(path, 16, 2, dtype), dtype))
    assert same_bits(state, back) == []

    plain = torch.nn.Module()  # built like the lecture's NormalModel, not from torchhet
    plain.layers = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.ReLU(),
                                       torch.nn.Linear(16, 16), torch.nn.ReLU())
    plain.mean_head = torch.nn.Linear(16, 1)
    plain.var_head = torch.nn.Linear(16, 1)
    plain.to({"float32": torch.float32, "float64": torch.float64}[dtype])
    from safetensors.torch import load_file

    plain.load_state_dict(load_file(path), strict=True)
    assert same_bits(state, {n: t.numpy() for n, t in plain.state_dict().items()}) == []


def test_kernel_is_the_transposed_weight():
    """The mapping itself: torch's (out, in) weight is Flax's (in, out) kernel, element by
    element, for the non-square first layer and the square hidden layer."""
    state = init_state("torch", 5, 2, "float64", seed=1)
    params = flax_params(state, "float64")
    flat = {path: v for path, v in nnx.to_flat_state(params)}
    for name in ("layers.0.weight", "layers.2.weight", "mean_head.weight"):
        path = jw.flax_path(name)
        var = flat[path]
        kernel = np.asarray(var.get_value() if hasattr(var, "get_value") else var)
        assert kernel.shape == state[name].shape[::-1]
        assert np.array_equal(kernel, state[name].T), name
        assert jw.torch_name(path) == name


def test_lecture_weights_are_shared():
    """The lecture preset's weights (drawn by torch) go through Flax unchanged."""
    state = interchange.lecture_weights()
    assert same_bits(state, jw.to_state_dict(flax_params(state, "float32"))) == []


@pytest.mark.parametrize("bad,expect", [
    (lambda s: {k: v for k, v in s.items() if k != "var_head.bias"}, "var_head.bias"),
    (lambda s: {**s, "layers.2.weight": s["layers.2.weight"][:, :3]}, "layers.2.weight"),
    (lambda s: {**s, "extra.weight": s["mean_head.weight"]}, "extra.weight"),
])
def test_misfit_weights_are_refused_by_name(bad, expect):
    state = bad(init_state("torch", 4, 2, "float32", seed=0))
    with pytest.raises(UsageError, match=expect.replace(".", r"\.")):
        flax_params(state, "float32")
    with pytest.raises(UsageError, match=expect.replace(".", r"\.")):
        torch_module(state, "float32")


def test_one_module_owns_the_mapping():
    """No file of jaxhet but weights.py names tensors: no string 'kernel', 'weight' or
    '*.weight' outside docstrings, and every jaxhet function that turns a state dict into
    parameters goes through jaxhet.weights."""
    offenders = []
    for name in sorted(os.listdir(os.path.join(ROOT, "jaxhet"))):
        if not name.endswith(".py") or name == "weights.py":
            continue
        with open(os.path.join(ROOT, "jaxhet", name), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef))
                      and n.body and isinstance(n.body[0], ast.Expr)
                      and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                    and id(node) not in docstrings
                    and ("kernel" in node.value or node.value.endswith("weight"))):
                offenders.append(f"{name}:{node.lineno} {node.value!r}")
    assert offenders == [], offenders
    import jaxhet.backend
    import jaxhet.engine

    assert jaxhet.engine.put is jw.put and jaxhet.backend.put is jw.put
    assert jaxhet.engine.to_state_dict is jw.to_state_dict
