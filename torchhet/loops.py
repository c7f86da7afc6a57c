"""Training loops, each a way to run the same SGD epoch; mirrors jaxhet/loops.py.

- `eager`: the lecture's loop, `param.data -= param.grad * lr` (the default on CPU);
- `optim`: torch.optim.SGD with its multi-tensor (foreach) update.

Each presents the same runner: `runner(n, losses)` runs n epochs and writes their losses
into the device tensor `losses[:n]`; nothing is read back to the host.
"""

from __future__ import annotations

import torch

from hetcore.errors import UsageError
from torchhet.model import gaussian_nll

LOOPS = ("eager", "optim")


def default_loop(device_type: str) -> str:
    """The loop that finishes a run soonest, warm-up included, on this device type."""
    return "eager"


def manual_step(model, x, y, lr: float, full: bool) -> torch.Tensor:
    """The lecture's epoch: forward, backward, `param.data -= param.grad * lr`."""
    model.zero_grad()
    mu, var = model(x)
    loss = gaussian_nll(mu, var, y, full)
    loss.backward()
    for param in model.parameters():
        param.data -= param.grad * lr
        param.grad = None
    return loss.detach()


def make_runner(loop: str, model, x, y, lr: float, full: bool):
    """(runner, warm-up seconds) for `loop`; see the module docstring."""
    if loop not in LOOPS:
        raise UsageError(f"--loop {loop}: not available in torchhet; it has {', '.join(LOOPS)}")
    if loop == "optim":
        opt = torch.optim.SGD(model.parameters(), lr=lr, foreach=True)

        def step():
            opt.zero_grad(set_to_none=True)
            mu, var = model(x)
            loss = gaussian_nll(mu, var, y, full)
            loss.backward()
            opt.step()
            return loss.detach()
    else:
        def step():
            return manual_step(model, x, y, lr, full)

    def runner(n: int, losses: torch.Tensor) -> None:
        for i in range(n):
            losses[i] = step()

    return runner, 0.0
