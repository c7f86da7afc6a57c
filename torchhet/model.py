"""The two-headed network and its loss, in PyTorch; mirrors jaxhet/model.py."""

from __future__ import annotations

import math

import torch

from hetcore.settings import EPS

softplus = torch.nn.functional.softplus  # beta 1, threshold 20; jaxhet.model mirrors it


class HeteroscedasticMLP(torch.nn.Module):
    """The lecture's NormalModel with `depth` and `width` as arguments.

    Modules are created in the lecture's order, so that under the same torch seed the
    default initialisation draws the lecture's weights.
    """

    def __init__(self, width: int = 512, depth: int = 2, *, dtype=torch.float32,
                 in_features: int = 1):
        super().__init__()
        trunk = []
        fan_in = in_features
        for _ in range(depth):
            trunk += [torch.nn.Linear(fan_in, width, dtype=dtype), torch.nn.ReLU()]
            fan_in = width
        self.layers = torch.nn.Sequential(*trunk)
        self.mean_head = torch.nn.Linear(width, 1, dtype=dtype)
        self.var_head = torch.nn.Linear(width, 1, dtype=dtype)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.heads(self.layers(x))

    def heads(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mu and var (N, 1) from the trunk's features (N, width)."""
        mu = self.mean_head(features)
        var = softplus(self.var_head(features)) + EPS
        return mu, var


def lean_forward(weights: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """mu and var of the model with these weights (its state-dict names), its narrow products
    written as what they are, for code that a compiler turns into one graph (torchhet/whole.py).

    At a batch of a few hundred rows a CPU spends more on calling a matrix product than on
    computing it. At depth 2 the model's update calls eleven, eight of them narrow (an
    inner or outer size of 1): the first layer's forward and weight gradient (one input),
    and each head's forward, weight gradient and input gradient (one output). Here the
    first layer is `x * w + b`, element-wise (its weight gradient a column sum that the
    compiler fuses into the ReLU's backward), and the two heads, their weights side by side,
    are products summed over the width, element-wise too (their backward a column sum and
    a broadcast product; as one product of two output columns they cost three MKL calls an
    update: docs/performance.md, 2026-12-03). Three products an update at depth 2, three
    more for each further layer. The same law; sums may be ordered differently (float64
    agrees to rounding, tests/test_model.py)."""
    first, bias = weights["layers.0.weight"], weights["layers.0.bias"]
    if first.shape[1] == 1:
        h = torch.relu(x * first.reshape(1, -1) + bias)
    else:
        h = torch.relu(torch.addmm(bias, x, first.t()))
    k = 2  # the trunk's Linear layers are layers.0, layers.2, ... (ReLUs between)
    while f"layers.{k}.weight" in weights:
        h = torch.relu(torch.addmm(weights[f"layers.{k}.bias"], h,
                                   weights[f"layers.{k}.weight"].t()))
        k += 2
    heads = torch.cat([weights["mean_head.weight"], weights["var_head.weight"]])
    out = (h.unsqueeze(1) * heads).sum(-1) + torch.cat([weights["mean_head.bias"],
                                                         weights["var_head.bias"]])
    return out[:, :1], softplus(out[:, 1:]) + EPS


def gaussian_nll(mu: torch.Tensor, var: torch.Tensor, target: torch.Tensor,
                 full: bool = False) -> torch.Tensor:
    """The lecture's loss: mean of log(var)/2 + (target - mu)**2 / (2 var).

    With `full`, adds 0.5*log(2*pi) as torch.nn.GaussianNLLLoss(full=True) does.
    """
    loss = (torch.log(var) / 2 + (target - mu) ** 2 / (2 * var)).mean()
    if full:
        loss = loss + 0.5 * math.log(2 * math.pi)
    return loss


def point_nll(mu: torch.Tensor, var: torch.Tensor, target: torch.Tensor,
              full: bool = False) -> torch.Tensor:
    """Each point's NLL, log(var)/2 + (target - mu)**2 / (2 var) (+ 0.5*log(2*pi))."""
    nll = torch.log(var) / 2 + (target - mu) ** 2 / (2 * var)
    return nll + 0.5 * math.log(2 * math.pi) if full else nll


def training_loss(loss: str, mu: torch.Tensor, var: torch.Tensor, target: torch.Tensor,
                  full: bool = False, beta: float | None = None) -> torch.Tensor:
    """The loss a run trains on (hetcore.settings.LOSSES): nll, the lecture's; beta-nll
    (Seitzer et al., 2022), the mean of var.detach()**beta times each point's NLL (beta 0
    is the NLL, the weight being exactly 1); mse, the mean of (target - mu)**2, which
    gives the variance head no gradient."""
    if loss == "nll":
        return gaussian_nll(mu, var, target, full)
    if loss == "beta-nll":
        return (var.detach() ** beta * point_nll(mu, var, target, full)).mean()
    return ((target - mu) ** 2).mean()


def point_loss(loss: str, mu: torch.Tensor, var: torch.Tensor, target: torch.Tensor,
               full: bool = False, beta: float | None = None) -> torch.Tensor:
    """Each point's term of training_loss, whose mean that loss is: what a data-parallel
    run sums over its share of a batch (torchhet.parallel)."""
    if loss == "nll":
        return point_nll(mu, var, target, full)
    if loss == "beta-nll":
        return var.detach() ** beta * point_nll(mu, var, target, full)
    return (target - mu) ** 2
