"""A run's optimiser through optax: Settings' update laws (sgd with PyTorch's momentum and
Nesterov, adam, adamw), the learning rate of each update, and the variance head frozen in
an MSE run; mirrors torchhet/optim.py.

What a compiled program is built for (`OptConfig`: the optimiser, the schedule's shape and
length, the frozen head) is static; the values a run may change without recompiling (the
learning rate, its end value, momentum, weight decay) are traced scalars (`hyper`).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np
import optax

from hetcore.settings import Settings

# Adam's constants: PyTorch's and optax's defaults, the project's law.
BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


@dataclass(frozen=True)
class OptConfig:
    """The static part of a run's optimiser (hashable: it keys the compiled programs)."""

    optimizer: str  # sgd, adam, adamw
    momentum: bool  # sgd with a momentum buffer (momentum > 0)
    nesterov: bool
    schedule: str  # constant, cosine
    warmup_steps: int
    total_updates: int
    frozen_var_head: bool  # mse: the variance head has no gradient and is never updated


def config(settings: Settings, n_points: int) -> OptConfig:
    return OptConfig(
        optimizer=settings.optimizer, momentum=bool(settings.momentum),
        nesterov=bool(settings.nesterov), schedule=settings.schedule,
        warmup_steps=settings.warmup_steps,
        total_updates=settings.epochs * settings.batches(n_points),
        frozen_var_head=settings.loss == "mse")


def hyper(settings: Settings, dtype: str) -> dict:
    """The optimiser's traced scalars, in the run's dtype (numpy values go to the device
    with the rest of the arguments)."""
    values = dict(lr=settings.lr, lr_end=settings.lr_end or 0.0,
                  momentum=settings.momentum or 0.0, weight_decay=settings.weight_decay or 0.0)
    return {k: np.asarray(v, dtype=dtype) for k, v in values.items()}


def learning_rate(cfg: OptConfig, h: dict):
    """A scalar or optax schedule of the update count: a linear warm-up from 0, then lr
    (constant) or a cosine decay to lr_end over the rest of the run.

    The parts of optax's warmup_cosine_decay_schedule, joined as it joins them: that
    function asks `peak == 0` of the learning rate in Python, which a traced learning rate
    cannot answer. The count reaches them in the run's dtype: optax's linear schedule
    divides an int32 count in float32 (lr * 1/3 off by 1e-8 relative in a float64 run, which
    the float64 reference caught)."""
    warm, total = cfg.warmup_steps, cfg.total_updates
    if cfg.schedule == "constant":
        if not warm:
            return h["lr"]
        after = optax.constant_schedule(h["lr"])
    else:
        after = optax.cosine_decay_schedule(h["lr"], total - warm, alpha=h["lr_end"] / h["lr"])
    sched = after if not warm else optax.join_schedules(
        [optax.linear_schedule(0.0, h["lr"], warm), after], [warm])
    dtype = h["lr"].dtype
    return lambda count: sched(count.astype(dtype))


def _frozen_labels(params):
    """'frozen' for the variance head's parameters, 'train' for the rest."""
    def label(path, _):
        return "frozen" if any(getattr(k, "key", None) == "var_head" for k in path) else "train"

    return jax.tree_util.tree_map_with_path(label, params)


def transform(cfg: OptConfig, h: dict) -> optax.GradientTransformation:
    """The run's optax transformation (built inside the compiled program each time it is
    traced, from traced scalars)."""
    lr = learning_rate(cfg, h)
    if cfg.optimizer == "sgd":
        tx = optax.sgd(lr, momentum=h["momentum"] if cfg.momentum else None,
                       nesterov=cfg.nesterov)
    elif cfg.optimizer == "adam":
        tx = optax.adam(lr, b1=BETAS[0], b2=BETAS[1], eps=ADAM_EPS)
    else:  # adamw: every parameter decays, biases included
        tx = optax.adamw(lr, b1=BETAS[0], b2=BETAS[1], eps=ADAM_EPS,
                         weight_decay=h["weight_decay"])
    if cfg.frozen_var_head:  # as torch.optim skips a parameter without a gradient
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                                   _frozen_labels)
    return tx
