"""torchhet's side of the backend contract (hetcore.backend.Backend); mirrors
jaxhet/backend.py name for name.

Imports torch and numpy, never JAX.
"""

from __future__ import annotations

import platform as _platform

import numpy as np
import torch

from hetcore.backend import EngineOptions
from hetcore.errors import UsageError
from hetcore.interchange import init_bound
from hetcore.settings import OPTION_DEFAULTS, Settings
from torchhet.device import describe, memory_bytes, platform, resolve_device  # noqa: F401
from torchhet.device import arithmetic, to_device
from torchhet.engine import LOOPS, TorchEngine
from torchhet.model import HeteroscedasticMLP, training_loss
from torchhet.weights import DTYPES, put, to_state_dict

NAME = "torch"  # the contract: hetcore.backend.Backend; the device functions come from device.py


def init_weights(width: int, depth: int, dtype: str, seed: int) -> dict[str, np.ndarray]:
    """Initial weights drawn from `seed` through a torch.Generator, as a state dict: the
    law nn.Linear.reset_parameters draws (hetcore.interchange.init_bound), from a local
    generator so that the global RNG is left as it was."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # construction draws nn.Linear's default init
        model = HeteroscedasticMLP(width, depth, dtype=DTYPES[dtype])
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                bound = init_bound(module.in_features)
                module.weight.uniform_(-bound, bound, generator=gen)
                module.bias.uniform_(-bound, bound, generator=gen)
    return to_state_dict(model)


def _beta(beta: float | None) -> float:
    return OPTION_DEFAULTS["beta"] if beta is None else beta


def predict(weights: dict, x: np.ndarray, device: str = "auto", full: bool = False,
            y: np.ndarray | None = None, loss: str = "nll", beta: float | None = None):
    """(mu, var, loss) as numpy for a state dict and inputs x (N, 1); loss needs y."""
    dev = resolve_device(device)
    model = put(weights, str(np.asarray(x).dtype), dev)
    with torch.no_grad(), arithmetic("highest"):
        mu, var = model(to_device(x, dev))
        value = None if y is None else float(
            training_loss(loss, mu, var, to_device(y, dev), full, _beta(beta)))
    return mu.cpu().numpy(), var.cpu().numpy(), value


def loss_and_grad(weights: dict, x: np.ndarray, y: np.ndarray, device: str = "auto",
                  full: bool = False, loss: str = "nll", beta: float | None = None
                  ) -> tuple[float, dict[str, np.ndarray]]:
    """Loss and the gradient of every parameter, gradients as a state dict (a parameter
    the loss does not reach, an MSE run's variance head: zeros)."""
    dev = resolve_device(device)
    model = put(weights, str(np.asarray(x).dtype), dev)
    with arithmetic("highest"):
        mu, var = model(to_device(x, dev))
        value = training_loss(loss, mu, var, to_device(y, dev), full, _beta(beta))
        value.backward()
    grads = {n: (np.zeros(tuple(p.shape), str(np.asarray(x).dtype)) if p.grad is None
                 else p.grad.detach().cpu().numpy().copy())
             for n, p in model.named_parameters()}
    return float(value.detach()), grads


def versions() -> dict:
    return {"python": _platform.python_version(), "numpy": np.__version__,
            "torch": torch.__version__}


def join(settings: Settings, cluster: dict) -> tuple[int, int]:
    """torch.distributed from its environment variables, when they are set
    (torchhet.parallel.initialize); before the train command starts --devices N processes
    itself, whether there are N devices (one line naming how many there are)."""
    from torchhet import parallel

    given = [k for k, v in cluster.items() if v is not None]
    if given:
        raise UsageError(f"--{given[0].replace('_', '-')}: jax's way of joining processes; "
                         "torch joins those torchrun starts (or --devices N starts)")
    env = parallel.environment()
    if settings.devices > 1 and env is None:  # the command starts the processes after this
        parallel.check_count(resolve_device(settings.device), settings.devices)
    if env is None:
        return 0, 1
    parallel.initialize(parallel.local_device(resolve_device(settings.device)))
    return env["RANK"], env["WORLD_SIZE"]


def leave() -> None:
    from torchhet import parallel

    parallel.leave()


def engine(settings: Settings, x: np.ndarray, y: np.ndarray, weights: dict,
           optimizer: dict | None = None, options: EngineOptions = EngineOptions(),
           held_out: tuple[np.ndarray, np.ndarray] | None = None) -> TorchEngine:
    """An engine for the run, warmed up (torchhet.engine; an ensemble's: torchhet.ensemble)."""
    if settings.ensemble > 1:
        from torchhet.ensemble import TorchEnsembleEngine, TorchEnsembleOverProcesses

        over = TorchEnsembleOverProcesses if settings.devices > 1 else TorchEnsembleEngine
        return over(settings, x, y, weights, optimizer, options, held_out)
    return TorchEngine(settings, x, y, weights, optimizer, options, held_out)
