"""The `no-autograd` loop: the lecture's epoch with its backward pass written out.

Autograd records every op of the forward pass and replays their gradients one by one; on
a CPU an epoch of the lecture's model is then about 60 small dispatches around its three
large matrix products, and each element-wise pass reads and writes a fresh (N, width)
block that no longer fits the core's cache. Written out, the epoch is the products and as
few in-place passes as the maths allows, into buffers allocated once:

    forward   h_l = relu(h_{l-1} W_l^T + b_l)     (eager's addmm, into a kept buffer; relu
                                                   in place)
              mu = h_L w_mu^T + b_mu, s = h_L w_var^T + b_var
              var = softplus(s) + eps, loss = mean(log(var)/2 + (y - mu)^2 / (2 var))
    backward  d mu = -(y - mu) / (var n),  d var = (1 - (y - mu)^2 / var) / (2 var n),
              d s = softplus'(s) d var  (torch's own softplus_backward: beta 1, threshold 20)
              g_L = [d mu, d s] [w_mu; w_var], zeroed where h_L = 0 (ReLU's gradient)
              g_{l-1} = g_l W_l (W_l before its update), zeroed where h_{l-1} = 0
    update    G_l = g_l^T h_{l-1} into one buffer, W_l <- W_l - (G_l * lr) (the lecture's two
                                                   roundings; the first layer as [W_1 | b_1]
                                                   against [x | 1], its bias in the same
                                                   product)
              other biases and the heads: p <- p - lr grad (multi-tensor ops)

The forward pass rounds as eager's does (the same calls), so epoch 0's loss is the
lecture's bit for bit; the backward pass does not quite (the heads' gradients are one
product). It trains the same run as `eager` to rounding (tests/test_loops.py: float64
losses to 1e-12, weights to 1e-11; tests/test_train.py: float32 losses to 1e-6 over the
lecture's first 100 epochs).

The weight gradient is not fused into the update (`W.addmm_(g^T, h, alpha=-lr)`), though
that would save a pass over W: with beta = 1 a BLAS may add each block of the product to
W as it goes, and adding many terms of 1e-7 to weights of order 1 one block at a time
loses them to W's rounding. MKL's AVX2 kernels do: in float32 the lecture's first
update of the first layer was off from float64's by 7% of the step (weights) and 40%
(biases), against 0.07% and 0.2% with the product stored first, as `eager` has it
(docs/numerics.md).

It keeps one (N, width) activation per layer and one gradient block: each layer's gradient
is written over the activation the backward pass has just finished with, depth + 1 blocks
in all (autograd's loops keep about two per layer at the peak), and one (width, width)
block for the weight gradient of the layer being updated. It has no rematerialisation,
which would pay off only for deep trunks.
"""

from __future__ import annotations

import math

import torch

from hetcore.settings import EPS

_softplus_backward = torch.ops.aten.softplus_backward


def trunk_linears(model) -> list[torch.nn.Linear]:
    return [m for m in model.layers if isinstance(m, torch.nn.Linear)]


def activation_bytes(model, x: torch.Tensor) -> int:
    """Bytes the backward pass keeps: one (N, width) block per trunk layer (the gradient
    block is not counted, as autograd's gradients are not)."""
    return sum(x.shape[0] * lin.out_features * x.element_size() for lin in trunk_linears(model))


def make_runner(model, x: torch.Tensor, y: torch.Tensor, lr: float, full: bool):
    """run(count, losses): `count` epochs, their losses written into the device tensor
    `losses[:count]`, `model` updated in place.

    Two parts are worked on as stacked copies, read from the model before each call and
    written back after it, even when it is interrupted (so a caller that sets the model's
    weights between calls, to replay a chunk, is seen): the heads (2, width) and (2,), and
    the first layer with its bias as one more input column, [W | b] against [x | 1], so
    that one product gives the layer's weight and bias update.
    """
    kinds = [type(m) for m in model.layers]
    if kinds != [torch.nn.Linear, torch.nn.ReLU] * (len(kinds) // 2) or not kinds:
        raise ValueError(f"no-autograd: expected Linear, ReLU pairs in model.layers, got "
                         f"{[k.__name__ for k in kinds]}")
    linears = trunk_linears(model)
    heads = (model.mean_head, model.var_head)
    first = linears[0]
    n, width = x.shape[0], linears[-1].out_features
    like = dict(dtype=x.dtype, device=x.device)
    acts = [torch.empty(n, lin.out_features, **like) for lin in linears]  # after relu
    top = torch.empty(n, width, **like)  # the top layer's gradient; the ones below go
    # into the activation buffer the backward pass has just finished with (see step)
    x1 = torch.cat([x, torch.ones(n, 1, **like)], 1)  # (n, in + 1)
    a_first = torch.empty(first.out_features, x1.shape[1], **like)  # [W | b]
    g_first = torch.empty_like(a_first)  # its gradient
    g_weight = torch.empty(width, width, **like) if len(linears) > 1 else None
    w_heads = torch.empty(2, width, **like)
    b_heads = torch.empty(2, **like)
    const = 0.5 * math.log(2 * math.pi)

    def step() -> torch.Tensor:
        # The forward pass makes eager's calls on views of the stacked copies, so that it
        # rounds as eager (and the lecture) do: epoch 0's loss is theirs, bit for bit.
        torch.addmm(a_first[:, -1], x, a_first[:, :-1].t(), out=acts[0]).relu_()
        for lin, inp, out in zip(linears[1:], acts, acts[1:]):
            torch.addmm(lin.bias, inp, lin.weight.t(), out=out).relu_()  # (n, width)
        h = acts[-1]
        mu = torch.addmm(b_heads[0:1], h, w_heads[0:1].t())  # (n, 1)
        s = torch.addmm(b_heads[1:2], h, w_heads[1:2].t())  # (n, 1), before softplus
        var = torch.nn.functional.softplus(s) + EPS
        r = y - mu
        loss = (torch.log(var) / 2 + r ** 2 / (2 * var)).mean()  # gaussian_nll's order
        inv = var.reciprocal_()  # var is not needed again
        q = r * r * inv
        d_mu = (r * inv).mul_(-1.0 / n)
        d_s = _softplus_backward(q.neg_().add_(1.0).mul_(inv).mul_(0.5 / n), s, 1, 20)
        dz = torch.cat([d_mu, d_s], 1)  # (n, 2)
        g = torch.mm(dz, w_heads, out=top)  # (n, width)
        _threshold_backward_(g, h)
        grads = [dz.t() @ h, dz.sum(0)]  # heads: weights (2, width), biases (2,)
        small = [w_heads, b_heads]
        for k in range(len(linears) - 1, 0, -1):
            lin, inp = linears[k], acts[k - 1]
            grads.append(g.sum(0))
            small.append(lin.bias)
            # acts[k] is spent: layer k+1's update and g's mask have read it
            g_in = torch.mm(g, lin.weight, out=acts[k])  # with W before its update
            _threshold_backward_(g_in, inp)
            lin.weight.sub_(torch.mm(g.t(), inp, out=g_weight).mul_(lr))
            g = g_in
        a_first.sub_(torch.mm(g.t(), x1, out=g_first).mul_(lr))  # weights and bias at once
        torch._foreach_sub_(small, torch._foreach_mul(grads, lr))
        return loss + const if full else loss

    def run(count: int, losses: torch.Tensor) -> None:
        with torch.no_grad():
            torch.cat([first.weight, first.bias[:, None]], 1, out=a_first)
            torch.cat([heads[0].weight, heads[1].weight], out=w_heads)
            torch.cat([heads[0].bias, heads[1].bias], out=b_heads)
            try:
                for i in range(count):
                    losses[i] = step()
            finally:  # the model whole again, whatever stopped the loop
                first.weight.copy_(a_first[:, :-1])
                first.bias.copy_(a_first[:, -1])
                for k, head in enumerate(heads):
                    head.weight.copy_(w_heads[k:k + 1])
                    head.bias.copy_(b_heads[k:k + 1])

    return run


def _threshold_backward_(grad: torch.Tensor, out: torch.Tensor) -> None:
    """ReLU's gradient in place: grad where relu's output `out` > 0, else 0."""
    torch.ops.aten.threshold_backward.grad_input(grad, out, 0, grad_input=grad)
