"""An independent float64 reference: the model, the losses, their gradients, the optimisers,
the learning-rate schedule and the batch order written out by hand in numpy from their laws
(no autodiff, no framework, no code of the project's), for checking both frameworks from
the same data and weights."""

import math

import numpy as np

EPS = 1e-6


def _softplus(z):
    return np.where(z > 20, z, np.log1p(np.exp(np.minimum(z, 20))))


def forward(state, x):
    """mu, var and the cache backprop needs; x (N, 1); weights in torch layout."""
    depth = sum(1 for n in state if n.startswith("layers.") and n.endswith(".weight"))
    h = x
    cache = []
    for k in range(depth):
        w, b = state[f"layers.{2 * k}.weight"], state[f"layers.{2 * k}.bias"]
        z = h @ w.T + b
        cache.append((h, z))
        h = np.maximum(z, 0)
    mu = h @ state["mean_head.weight"].T + state["mean_head.bias"]
    s = h @ state["var_head.weight"].T + state["var_head.bias"]
    var = _softplus(s) + EPS
    return mu, var, (cache, h, s)


def loss(state, x, y):
    mu, var, _ = forward(state, x)
    return float(np.mean(0.5 * np.log(var) + (y - mu) ** 2 / (2 * var)))


def loss_and_grad(state, x, y, kind="nll", beta=0.5, full=False):
    """Loss and every parameter's gradient by hand-written backpropagation.

    kind: nll, beta-nll (var**beta, not differentiated, times each point's NLL) or mse (the
    mean of (y - mu)**2: the variance head's gradient is zero)."""
    state = {n: np.asarray(a, np.float64) for n, a in state.items()}
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n = x.shape[0]
    mu, var, (cache, h, s) = forward(state, x)
    point = 0.5 * np.log(var) + (y - mu) ** 2 / (2 * var) + (0.5 * math.log(2 * math.pi)
                                                            if full else 0.0)
    if kind == "mse":
        value = float(np.mean((y - mu) ** 2))
        d_mu = 2 * (mu - y) / n
        d_var = np.zeros_like(var)
    else:
        weight = var ** beta if kind == "beta-nll" else np.ones_like(var)
        value = float(np.mean(weight * point))
        d_mu = weight * -(y - mu) / var / n  # (N, 1)
        d_var = weight * (0.5 / var - (y - mu) ** 2 / (2 * var ** 2)) / n
    d_s = d_var * (1.0 / (1.0 + np.exp(-np.minimum(s, 20))))  # softplus' = sigmoid
    d_s = np.where(s > 20, d_var, d_s)
    g = {
        "mean_head.weight": d_mu.T @ h, "mean_head.bias": d_mu.sum(0),
        "var_head.weight": d_s.T @ h, "var_head.bias": d_s.sum(0),
    }
    d_h = d_mu @ state["mean_head.weight"] + d_s @ state["var_head.weight"]
    for k in reversed(range(len(cache))):
        h_in, z = cache[k]
        d_z = d_h * (z > 0)
        g[f"layers.{2 * k}.weight"] = d_z.T @ h_in
        g[f"layers.{2 * k}.bias"] = d_z.sum(0)
        d_h = d_z @ state[f"layers.{2 * k}.weight"]
    return value, g


def learning_rate(t, lr, total, schedule="constant", warmup=0, lr_end=0.0):
    """Update t's learning rate: lr t / W during the warm-up, then lr or the cosine."""
    if t < warmup:
        return lr * t / warmup
    if schedule == "constant":
        return lr
    return lr_end + (lr - lr_end) * (1 + math.cos(math.pi * (t - warmup) / (total - warmup))) / 2


class Optimizer:
    """PyTorch's SGD (dampening 0, the buffer starting as the first gradient; Nesterov),
    Adam and AdamW (decoupled decay of every parameter), from their documented laws."""

    def __init__(self, kind="sgd", momentum=0.0, nesterov=False, weight_decay=0.0,
                 betas=(0.9, 0.999), eps=1e-8, frozen=()):
        self.kind, self.momentum, self.nesterov = kind, momentum, nesterov
        self.wd, self.betas, self.eps, self.frozen = weight_decay, betas, eps, set(frozen)
        self.state, self.t = {}, 0

    def step(self, params, grads, lr):
        self.t += 1
        b1, b2 = self.betas
        for n in params:
            if n in self.frozen:
                continue
            g = grads[n]
            if self.kind == "sgd":
                if self.momentum:
                    buf = g.copy() if n not in self.state else self.momentum * self.state[n] + g
                    self.state[n] = buf
                    g = g + self.momentum * buf if self.nesterov else buf
                params[n] = params[n] - lr * g
                continue
            m, v = self.state.get(n, (np.zeros_like(g), np.zeros_like(g)))
            m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
            self.state[n] = (m, v)
            m_hat, v_hat = m / (1 - b1 ** self.t), v / (1 - b2 ** self.t)
            step = m_hat / (np.sqrt(v_hat) + self.eps)
            if self.kind == "adamw":
                step = step + self.wd * params[n]
            params[n] = params[n] - lr * step


def epoch_order(seed, epoch, n):
    return np.random.default_rng([seed, epoch]).permutation(n)


def train(state, x, y, lr, epochs, kind="nll", beta=0.5, optimizer=None, batch_size=None,
          shuffle_seed=0, schedule="constant", warmup=0, lr_end=0.0, full=False):
    """A run from the laws; returns the loss history (each epoch's point-weighted mean of
    its batch losses, each before its own update) and the final weights."""
    state = {n: np.asarray(a, np.float64).copy() for n, a in state.items()}
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n = x.shape[0]
    b = n if batch_size is None or batch_size >= n else batch_size
    per_epoch = -(-n // b)
    total = epochs * per_epoch
    opt = optimizer or Optimizer()
    history, t = [], 0
    for e in range(epochs):
        order = np.arange(n) if b == n else epoch_order(shuffle_seed, e, n)
        weighted = 0.0
        for start in range(0, n, b):
            idx = order[start:start + b]
            value, g = loss_and_grad(state, x[idx], y[idx], kind, beta, full)
            weighted += value * len(idx)
            opt.step(state, g, learning_rate(t, lr, total, schedule, warmup, lr_end))
            t += 1
        history.append(weighted / n)
    return np.array(history), state
