"""Training: the lecture's SGD loop, synced with the host once per chunk of epochs.

Mirrors jaxhet/train.py. A run is a pure function of (settings, data, initial weights).
"""

from __future__ import annotations

import platform
import time

import numpy as np
import torch

from hetcore.checkpoint import Checkpoint, spans
from hetcore.errors import TrainingDiverged, UsageError
from hetcore.interchange import architecture
from hetcore.results import RunResult, chunk_length, first_nonfinite
from hetcore.settings import Settings
from torchhet.device import describe, resolve_device
from torchhet.loops import default_loop, make_runner
from torchhet.model import HeteroscedasticMLP, gaussian_nll
from torchhet.weights import from_state_dict, to_state_dict

FRAMEWORK = "torch"
# Full float32 matrix products (no TF32) on every device (SPEC section 4). The benchmark's
# labelled `--precision tf32` option alone sets "high" here, for its own runs.
MATMUL_PRECISION = "highest"


def enable_dtype(dtype: str) -> None:
    torch.set_float32_matmul_precision(MATMUL_PRECISION)


def _dtype(dtype: str) -> torch.dtype:
    return {"float32": torch.float32, "float64": torch.float64}[dtype]


def init_weights(width: int, depth: int, dtype: str, seed: int) -> dict[str, np.ndarray]:
    """Initial weights drawn from `seed` with torch's default law, as a state dict.

    A local generator keeps the global RNG untouched: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    for weights and biases is what nn.Linear.reset_parameters draws.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # construction draws nn.Linear's default init
        model = HeteroscedasticMLP(width, depth, dtype=_dtype(dtype))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                bound = 1.0 / module.in_features ** 0.5
                module.weight.uniform_(-bound, bound, generator=gen)
                module.bias.uniform_(-bound, bound, generator=gen)
    return to_state_dict(model)


def _tensor(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """A copy on `device` (numpy arrays may be read-only or non-contiguous)."""
    return torch.tensor(np.asarray(a), device=device)


def _finite(params: list) -> bool:
    """Whether every weight is finite: one host sync, as the chunk's losses are read."""
    return bool(torch.stack([torch.isfinite(p).all() for p in params]).all())


def _build(weights: dict, dtype: str, device: torch.device) -> HeteroscedasticMLP:
    width, depth = architecture(weights)
    model = HeteroscedasticMLP(width, depth, dtype=_dtype(dtype))
    from_state_dict({n: np.asarray(a, dtype=dtype) for n, a in weights.items()}, model)
    return model.to(device)


def predict(weights: dict, x: np.ndarray, device: str = "auto", full: bool = False,
            y: np.ndarray | None = None):
    """(mu, var, loss) as numpy for a state dict and inputs x (N, 1); loss needs y."""
    dtype = str(np.asarray(x).dtype)
    enable_dtype(dtype)
    dev = resolve_device(device)
    model = _build(weights, dtype, dev)
    with torch.no_grad():
        xs = _tensor(x, dev)
        mu, var = model(xs)
        loss = None
        if y is not None:
            loss = float(gaussian_nll(mu, var, _tensor(y, dev), full))
    return mu.cpu().numpy(), var.cpu().numpy(), loss


def loss_and_grad(weights: dict, x: np.ndarray, y: np.ndarray, device: str = "auto",
                  full: bool = False) -> tuple[float, dict[str, np.ndarray]]:
    """Loss and the gradient of every parameter, gradients as a state dict."""
    dtype = str(np.asarray(x).dtype)
    enable_dtype(dtype)
    dev = resolve_device(device)
    model = _build(weights, dtype, dev)
    mu, var = model(_tensor(x, dev))
    loss = gaussian_nll(mu, var, _tensor(y, dev), full)
    loss.backward()
    grads = {n: p.grad.detach().cpu().numpy().copy() for n, p in model.named_parameters()}
    return float(loss.detach()), grads


def versions() -> dict:
    return {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__}


def train(settings: Settings, x: np.ndarray, y: np.ndarray, initial_weights: dict,
          progress=None, resume: Checkpoint | None = None, on_checkpoint=None) -> RunResult:
    """Train from `initial_weights` (a state dict) on x, y (N, 1) as `settings` say.

    Args:
      settings: epochs, lr, dtype, device, loss option, chunk length, loop and checkpoint
        interval are read here.
      x, y: training data, (N, 1) arrays of settings.dtype.
      initial_weights: state dict of settings.dtype.
      progress: optional callable(epochs_done, last_loss), called once per chunk.
      resume: a checkpoint of this run to continue from (its epoch, weights, optimiser state
        and loss history); the result is that of the uninterrupted run, bit for bit.
      on_checkpoint: callable(epoch, weights, optimizer, loss_history), called every
        settings.checkpoint_every epochs (and at the end) with host copies.

    Returns:
      RunResult. Raises TrainingDiverged at the first epoch whose loss is not finite.
    """
    dtype = settings.dtype
    enable_dtype(dtype)
    device = resolve_device(settings.device)
    model = _build(initial_weights if resume is None else resume.weights, dtype, device)
    history = np.full(settings.epochs, np.nan)
    first = 0
    if resume is not None:
        # Both loops are plain SGD (no momentum): there is no optimiser state to restore.
        if resume.optimizer:
            raise UsageError(f"--resume: optimizer state has {len(resume.optimizer)} tensors, "
                             "expected none (plain SGD)")
        first = resume.epoch
        history[:first] = resume.loss_history
    xs = _tensor(x, device)
    ys = _tensor(y, device)
    length = chunk_length(settings.epochs, settings.chunk_epochs, settings.checkpoint_every)
    loop = (default_loop(device.type, settings.epochs, settings.remat)
            if settings.loop == "auto" else settings.loop)
    run_chunk, compile_s = make_runner(loop, model, xs, ys, settings.lr, settings.full,
                                       settings.remat)

    losses = torch.empty(length, dtype=_dtype(dtype), device=device)
    params = list(model.parameters())
    t0 = time.perf_counter()
    for start, n, checkpoint_after in spans(first, settings.epochs, length,
                                            settings.checkpoint_every):
        before = [p.detach().clone() for p in params]  # to replay a chunk that went bad
        run_chunk(n, losses)  # losses stay on the device; read once per chunk
        part = losses[:n].cpu().numpy().copy()  # on a CPU .numpy() shares losses' memory,
        # which a replay below writes again
        history[start:start + n] = part
        bad = first_nonfinite(part)
        if bad is not None or not _finite(params):
            # Replay the chunk epoch by epoch (deterministic) to name what failed first, as
            # jaxhet's compiled epoch does: a non-finite loss, or an update that made the
            # weights non-finite while its loss was finite (then the next loss is nan).
            with torch.no_grad():
                for p, b in zip(params, before):
                    p.copy_(b)
            for i in range(n if bad is None else bad + 1):
                run_chunk(1, losses)
                if not np.isfinite(part[i]):
                    break
                if not _finite(params):
                    raise TrainingDiverged(FRAMEWORK, start + i, float(part[i]), weights=True)
            if bad is None:  # the replay stayed finite (a nondeterministic device): the
                # weights were non-finite by the chunk's end, which is all that is known
                raise TrainingDiverged(FRAMEWORK, start + n - 1, float(part[-1]), weights=True)
            raise TrainingDiverged(FRAMEWORK, start + bad, float(part[bad]))
        if progress is not None:
            progress(start + n, float(part[-1]))
        if checkpoint_after and on_checkpoint is not None:
            on_checkpoint(start + n, to_state_dict(model), {}, history[:start + n].astype(dtype))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_s = time.perf_counter() - t0
    # A loop's own buffers (no-autograd keeps depth + 1 (N, width) blocks, CUDA graphs a
    # pool) go before the final forward pass allocates its own: not both at the peak.
    del run_chunk

    with torch.no_grad():
        mu, var = model(xs)
        loss = gaussian_nll(mu, var, ys, settings.full)
    return RunResult(
        framework=FRAMEWORK, device=describe(device), dtype=dtype,
        loss_history=history.astype(dtype), initial_weights=dict(initial_weights),
        weights=to_state_dict(model), mu=mu[:, 0].cpu().numpy(), var=var[:, 0].cpu().numpy(),
        final_loss=float(loss), compile_s=compile_s, train_s=train_s, versions=versions(), loop=loop,
    )
