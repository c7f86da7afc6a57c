"""An independent float64 reference: the model, loss and gradients written out by hand in
numpy (no autodiff, no framework), for checking both frameworks from the same data and
weights."""

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


def loss_and_grad(state, x, y):
    """Loss and every parameter's gradient by hand-written backpropagation."""
    state = {n: np.asarray(a, np.float64) for n, a in state.items()}
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n = x.shape[0]
    mu, var, (cache, h, s) = forward(state, x)
    value = float(np.mean(0.5 * np.log(var) + (y - mu) ** 2 / (2 * var)))
    d_mu = -(y - mu) / var / n  # (N, 1)
    d_var = (0.5 / var - (y - mu) ** 2 / (2 * var ** 2)) / n
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


def train(state, x, y, lr, epochs):
    """Full-batch SGD; returns the loss history and the final weights."""
    state = {n: np.asarray(a, np.float64).copy() for n, a in state.items()}
    history = []
    for _ in range(epochs):
        value, g = loss_and_grad(state, x, y)
        history.append(value)
        for name in state:
            state[name] -= lr * g[name]
    return np.array(history), state
