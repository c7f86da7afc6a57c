"""The one place that maps Flax parameters to and from the interchange state dict.

Rule: torch name `A.B.weight` is Flax path (A, B, kernel) transposed, (out, in) <-> (in, out);
`A.B.bias` is (A, B, bias) as it is; `layers.i` is `layers.layers[i]` because Flax's
Sequential keeps its modules in an attribute of its own. Every name and shape is checked.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hetcore.errors import UsageError
from hetcore.interchange import architecture, names
from jaxhet.device import enable_x64
from jaxhet.model import PRECISION, HeteroscedasticMLP


def flax_path(name: str) -> tuple:
    """'layers.2.weight' -> ('layers', 'layers', 2, 'kernel'); 'mean_head.bias' ->
    ('mean_head', 'bias')."""
    parts = name.split(".")
    leaf = {"weight": "kernel", "bias": "bias"}[parts[-1]]
    if parts[0] == "layers":
        return ("layers", "layers", int(parts[1]), leaf)
    return (parts[0], leaf)


def torch_name(path: tuple) -> str:
    """The inverse of flax_path."""
    leaf = {"kernel": "weight", "bias": "bias"}[path[-1]]
    if path[0] == "layers":
        return f"layers.{path[2]}.{leaf}"
    return f"{path[0]}.{leaf}"


def to_state_dict(params: nnx.State) -> dict[str, np.ndarray]:
    """Flax parameters -> torch-layout numpy arrays, in module order."""
    out = {}
    for path, var in nnx.to_flat_state(params):
        a = np.asarray(jax.device_get(var.get_value() if hasattr(var, "get_value") else var))
        name = torch_name(path)
        out[name] = np.ascontiguousarray(a.T) if path[-1] == "kernel" else a
    depth = sum(1 for n in out if n.startswith("layers.") and n.endswith(".weight"))
    return {n: out[n] for n in names(depth)}


def from_state_dict(state: dict, abstract: nnx.State) -> nnx.State:
    """Torch-layout arrays -> a Flax parameter State shaped like `abstract`.

    Raises UsageError naming the first tensor that is missing, extra, or misshapen.
    """
    flat = list(nnx.to_flat_state(abstract))
    wanted = {torch_name(path) for path, _ in flat}
    extra = sorted(set(state) - wanted)
    if extra:
        raise UsageError(f"weights: unexpected tensor '{extra[0]}'")
    pure = {}
    for path, var in flat:
        name = torch_name(path)
        if name not in state:
            raise UsageError(f"weights: missing tensor '{name}'")
        a = np.asarray(state[name])
        a = a.T if path[-1] == "kernel" else a
        shape = tuple(var.get_value().shape if hasattr(var, "get_value") else var.shape)
        if a.shape != shape:
            want = shape[::-1] if path[-1] == "kernel" else shape
            raise UsageError(
                f"weights: tensor '{name}' has shape {tuple(np.shape(state[name]))}, "
                f"expected {want}"
            )
        node = pure
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = np.ascontiguousarray(a)
    params = jax.tree.map(lambda x: x, abstract)
    nnx.replace_by_pure_dict(params, pure)
    return params


def abstract_model(width: int, depth: int, dtype: str, precision=PRECISION):
    """GraphDef and abstract parameter State of the model, without allocating weights."""
    enable_x64(dtype)
    model = nnx.eval_shape(lambda: HeteroscedasticMLP(
        width, depth, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0), precision=precision))
    return nnx.split(model, nnx.Param)


def put(state: dict, dtype: str, device, precision=PRECISION, width: int | None = None,
        depth: int | None = None):
    """(graphdef, params): a state dict as the parameters of the model of `width` and
    `depth` (default: the state's own) in `dtype` on `device`; a tensor that does not fit
    is a UsageError naming it."""
    if width is None or depth is None:
        width, depth = architecture(state)
    graphdef, abstract = abstract_model(width, depth, dtype, precision)
    params = from_state_dict({n: np.asarray(a, dtype=dtype) for n, a in state.items()}, abstract)
    return graphdef, jax.device_put(params, device)
