"""What the parity tests share: shared weights and data, each framework's eager and
compiled evaluation, training runs and their one-ulp twins.

Weights and data are made once, in numpy or by one framework's initialiser, and fed to
both frameworks as a torch-layout state dict (hetcore.interchange).
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np
import torch

import jaxhet.backend as jb
import torchhet.backend as tb
from hetcore import criteria, data, driver, interchange
from hetcore.settings import Settings
from torchhet.model import HeteroscedasticMLP as TorchMLP
from torchhet.model import gaussian_nll as torch_nll

INITS = ("torch", "flax")
DTYPES = ("float64", "float32")
# torch.compile's backend for the "compiled" torch variant. inductor generates its own
# kernels (other summation orders): the real test, but ~40 s of C++ compilation per graph
# on a 2-core CPU; aot_eager runs the same captured and decomposed forward/backward graph
# on ATen kernels. Default: inductor on a GPU, aot_eager on CPU.
TORCH_BACKEND = os.environ.get(
    "HET_TORCH_COMPILE_BACKEND",
    "inductor" if os.environ.get("HET_DEVICE", "cpu") == "gpu" else "aot_eager",
)


def init_state(init: str, width: int, depth: int, dtype: str, seed: int) -> dict:
    """Initial weights drawn by one framework: 'torch' (torch.Generator, nn.Linear's law)
    or 'flax' (jax.random through nnx), as a torch-layout state dict (a fresh copy)."""
    return {n: a.copy() for n, a in _init_state(init, width, depth, dtype, seed).items()}


@functools.lru_cache(maxsize=None)
def _init_state(init, width, depth, dtype, seed):
    if init == "torch":
        return tb.init_weights(width, depth, dtype, seed)
    if init == "flax":
        return jb.init_weights(width, depth, dtype, seed)
    raise ValueError(init)


def dataset(n: int, dtype: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n points of the lecture's law, (n, 1) columns of dtype."""
    return data.synthetic(n, seed).columns(dtype)


def grid(n: int, dtype: str, lo: float = -3.0, hi: float = 3.0) -> np.ndarray:
    return np.linspace(lo, hi, n).astype(dtype).reshape(-1, 1)  # (n, 1)


# --- evaluation: (mu, var, loss, grads) per framework and variant -------------------------


def jax_eval(state, x, y, device, full=False, eager=False):
    """JAX's mu, var, loss and gradients; eager runs op by op (jax.disable_jit)."""
    if eager:
        with jax.disable_jit():
            mu, var, loss = jb.predict(state, x, device, full, y)
            loss_g, grads = jb.loss_and_grad(state, x, y, device, full)
    else:
        mu, var, loss = jb.predict(state, x, device, full, y)
        loss_g, grads = jb.loss_and_grad(state, x, y, device, full)
    return {"mu": mu, "var": var, "loss": loss, "loss_g": loss_g, "grads": grads}


def torch_eval(state, x, y, device, full=False):
    mu, var, loss = tb.predict(state, x, device, full, y)
    loss_g, grads = tb.loss_and_grad(state, x, y, device, full)
    return {"mu": mu, "var": var, "loss": loss, "loss_g": loss_g, "grads": grads}


_TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_compiled_fn = None
COMPILES = {"count": 0, "dtypes": set()}  # graphs compiled, and their float dtypes


def _counting_backend(gm, example_inputs):
    COMPILES["count"] += 1
    COMPILES["dtypes"] |= {str(t.dtype).replace("torch.", "") for t in example_inputs
                           if isinstance(t, torch.Tensor) and t.is_floating_point()}
    return torch._dynamo.lookup_backend(TORCH_BACKEND)(gm, example_inputs)


def _loss_fn(model, params, x, y, full: bool):
    mu, var = torch.func.functional_call(model, params, (x,))
    return torch_nll(mu, var, y, full), mu, var


def torch_compiled_eval(state, x, y, device, full=False):
    """torch's mu, var, loss and gradients through torch.compile (fullgraph: no silent
    fallback to eager). Returns the results and how many graphs were compiled so far."""
    global _compiled_fn
    if _compiled_fn is None:
        torch._dynamo.config.cache_size_limit = 64
        _compiled_fn = torch.compile(_loss_fn, backend=_counting_backend, fullgraph=True,
                                     dynamic=False)
    dtype = str(np.asarray(x).dtype)
    dev = tb.resolve_device(device)
    width, depth = interchange.architecture(state)
    model = TorchMLP(width, depth, dtype=_TORCH_DTYPES[dtype]).to(dev)
    params = {n: torch.tensor(a, device=dev, requires_grad=True)
              for n, a in interchange.cast(state, dtype).items()}
    xs = torch.from_numpy(np.ascontiguousarray(x)).to(dev)
    ys = torch.from_numpy(np.ascontiguousarray(y)).to(dev)
    loss, mu, var = _compiled_fn(model, params, xs, ys, full)
    loss.backward()
    return {"mu": mu.detach().cpu().numpy(), "var": var.detach().cpu().numpy(),
            "loss": float(loss.detach()), "loss_g": float(loss.detach()),
            "grads": {n: p.grad.cpu().numpy() for n, p in params.items()}}


def evaluate(variant: str, state, x, y, device, full=False):
    """variant: jax-jit, jax-eager, torch-eager or torch-compiled."""
    if variant == "jax-jit":
        return jax_eval(state, x, y, device, full)
    if variant == "jax-eager":
        return jax_eval(state, x, y, device, full, eager=True)
    if variant == "torch-eager":
        return torch_eval(state, x, y, device, full)
    if variant == "torch-compiled":
        return torch_compiled_eval(state, x, y, device, full)
    raise ValueError(variant)


def single_step_checks(a: dict, b: dict, dtype: str, labels=("jax", "torch")) -> list:
    """Forward outputs, loss (both entry points) and every gradient under SINGLE_STEP."""
    bound = criteria.SINGLE_STEP[dtype]
    checks = [criteria.check_close(q, a[q], b[q], bound, dtype, labels)
              for q in ("mu", "var", "loss", "loss_g")]
    return checks + criteria.check_states("grad", a["grads"], b["grads"], bound, dtype, labels)


# --- training ------------------------------------------------------------------------------


def settings(width, depth, dtype, epochs, lr, device, full=False, framework="jax",
             loop="auto") -> Settings:
    return Settings(framework=framework, preset="none", width=width, depth=depth, dtype=dtype,
                    epochs=epochs, lr=lr, device=device, full=full, seed=0,
                    chunk_epochs=max(1, epochs // 2), loop=loop)


def train_pair(s: Settings, x, y, state, twins: int = 0, loops=("auto", "auto")) -> dict:
    """Both frameworks' runs from `state` and, per framework, `twins` one-ulp twin runs.

    loops: (jax loop, torch loop), names as in hetcore.settings.LOOPS.
    """
    sj = s.replace(framework="jax", loop=loops[0])
    st = s.replace(framework="torch", loop=loops[1])
    out = {"jax": driver.train(jb, sj, x, y, state), "torch": driver.train(tb, st, x, y, state),
           "twins": {"jax": [], "torch": []}}
    for k in range(twins):
        nudged = criteria.ulp_perturb(state, seed=k)
        out["twins"]["jax"].append(driver.train(jb, sj, x, y, nudged))
        out["twins"]["torch"].append(driver.train(tb, st, x, y, nudged))
    return out


def floor_gaps(pair: dict) -> list:
    return [criteria.gap(pair[n].loss_history, t.loss_history)
            for n in ("jax", "torch") for t in pair["twins"][n]]


def twin_pairs(pair: dict, get) -> list:
    """(base, twin) values of one quantity, `get(result)`, for final_floor_check."""
    return [(get(pair[n]), get(t)) for n in ("jax", "torch") for t in pair["twins"][n]]


def jax_sgd_eager(state, x, y, lr, epochs, device, full=False):
    """SGD written out with JAX's eager loss_and_grad: the update in numpy, in the state's
    dtype, as the lecture writes it (param -= lr * grad)."""
    dtype = str(np.asarray(x).dtype)
    state = {n: np.array(a, dtype=dtype) for n, a in state.items()}
    lr = np.asarray(lr, dtype=dtype)
    history = []
    with jax.disable_jit():
        for _ in range(epochs):
            loss, g = jb.loss_and_grad(state, x, y, device, full)
            history.append(loss)
            state = {n: state[n] - lr * g[n] for n in state}
    return np.array(history), state
