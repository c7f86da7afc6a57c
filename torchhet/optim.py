"""A run's optimiser through torch.optim: Settings' update laws (SGD with momentum and
Nesterov, Adam, AdamW) and the learning rate of each update; mirrors jaxhet/optim.py.

The schedule sets each parameter group's learning rate from the update's count before the
optimiser's step, which is what torch.optim.lr_scheduler.LambdaLR does, without its state:
a replay of a chunk or a resumed run needs only the count (hetcore.schedule.learning_rate
is the law; optax's schedule is jaxhet's). An MSE run's variance head has no gradient, so
torch.optim skips it: no step, no state, no weight decay.
"""

from __future__ import annotations

import numpy as np
import torch

from hetcore.schedule import learning_rate
from hetcore.settings import Settings

BETAS = (0.9, 0.999)  # Adam's constants: PyTorch's and optax's defaults, the project's law
ADAM_EPS = 1e-8


def make(settings: Settings, params: list, device: torch.device) -> torch.optim.Optimizer:
    """The torch.optim optimiser of `settings` over `params`, fused (one kernel for every
    parameter's update) on a CPU as on CUDA: measured on a 2-core CPU, 20,000 points in
    batches of 250 with Adam, 52-56 ms an epoch fused against 72-76 ms multi-tensor
    (foreach), whose per-update overhead of several kernels dominates small batches
    (docs/performance.md)."""
    kinds = dict(fused=True)
    if settings.optimizer == "sgd":
        return torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum or 0.0,
                               nesterov=bool(settings.nesterov), **kinds)
    if settings.optimizer == "adam":
        return torch.optim.Adam(params, lr=settings.lr, betas=BETAS, eps=ADAM_EPS, **kinds)
    return torch.optim.AdamW(params, lr=settings.lr, betas=BETAS, eps=ADAM_EPS,
                             weight_decay=settings.weight_decay, **kinds)


class Schedule:
    """The learning rate of update t of the run (hetcore.schedule.learning_rate)."""

    def __init__(self, settings: Settings, n_points: int):
        self.s = settings
        self.total = settings.epochs * settings.batches(n_points)
        self.constant = settings.schedule == "constant" and not settings.warmup_steps

    def __call__(self, t: int) -> float:
        if self.constant:
            return self.s.lr
        return learning_rate(t, self.s.lr, self.total, self.s.schedule, self.s.warmup_steps,
                             self.s.lr_end)

    def set(self, opt: torch.optim.Optimizer, t: int) -> None:
        """Give every parameter group update t's learning rate."""
        if not self.constant:
            for group in opt.param_groups:
                group["lr"] = self(t)


def state(opt: torch.optim.Optimizer | None, names: list[str]) -> dict[str, np.ndarray]:
    """The optimiser's state as named arrays (parameter name, then the state's key), for a
    checkpoint; {} for an optimiser that keeps none (plain SGD)."""
    if opt is None:
        return {}
    out = {}
    for index, entries in opt.state_dict()["state"].items():
        for key, value in entries.items():
            out[f"{names[index]}.{key}"] = torch.as_tensor(value).detach().cpu().numpy().copy()
    return out


def load(opt: torch.optim.Optimizer, names: list[str], arrays: dict[str, np.ndarray],
         device: torch.device) -> None:
    """The inverse of `state`: the optimiser continues exactly where the checkpoint's left."""
    sd = opt.state_dict()
    per_param: dict[int, dict] = {}
    for key, a in arrays.items():
        name, _, entry = key.rpartition(".")
        if name not in names:
            raise KeyError(key)
        # step counters stay on the CPU, as torch.optim keeps them (capturable: off)
        value = torch.from_numpy(np.array(a))
        per_param.setdefault(names.index(name), {})[entry] = (
            value if entry == "step" else value.to(device))
    sd["state"] = per_param
    opt.load_state_dict(sd)
