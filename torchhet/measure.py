"""What the benchmark measures inside torch (hetcore.backend.Measure); mirrors
jaxhet/measure.py. Devices are named as --device names them."""

from __future__ import annotations

import torch

from hetcore.backend import EngineOptions
from hetcore.schedule import batch_sizes
from hetcore.settings import Settings
from hetcore.timing import timed
from torchhet import handgrad
from torchhet.device import arithmetic, resolve_device, sync, to_device
from torchhet.engine import default_loop, forward_loss
from torchhet.weights import DTYPES, put


def _timer(device: torch.device):
    return lambda outs: sync(device)


def matmul_seconds(size: int, dtype: str, device: str, repeats: int = 5) -> list[float]:
    """Seconds of each of `repeats` (size x size) @ (size x size) products at full
    precision, after warm-up."""
    dev = resolve_device(device)
    a = torch.randn(size, size, dtype=DTYPES[dtype], device=dev)
    b = torch.randn(size, size, dtype=DTYPES[dtype], device=dev)
    out = torch.empty(size, size, dtype=DTYPES[dtype], device=dev)
    with arithmetic("highest"):
        return timed(lambda: torch.mm(a, b, out=out), _timer(dev), repeats)


def floor_seconds(n: int, width: int, depth: int, dtype: str, device: str, repeats: int = 5,
                  batch: int | None = None, members: int = 1) -> list[float]:
    """One epoch's own matrix products, back to back and nothing else (the matmul floor):
    for each of its updates (one of every point, or one a batch of `batch`, the last
    shorter: hetcore.schedule.batch_sizes), per block the forward product, the weight
    gradient and (but for the first block) the input gradient, in the layouts the epoch
    uses; the heads' products likewise. members > 1: an ensemble's, every product batched
    over the members."""
    dev = resolve_device(device)
    g = torch.Generator(device="cpu").manual_seed(0)
    lead = (members,) if members > 1 else ()

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=DTYPES[dtype]).to(dev)

    sizes = batch_sizes(n, batch)
    data = {b: (r(*lead, b, 1), [r(*lead, b, width) for _ in range(depth)], r(*lead, b, 2))
            for b in sorted(set(sizes))}  # per batch size: x, the blocks' outputs, gh
    ws = [r(*lead, width, 1)] + [r(*lead, width, width) for _ in range(depth - 1)]
    heads = r(*lead, 2, width)  # mean and variance heads stacked

    def update(x, hs, gh):  # gh: the loss's gradient at the two heads' outputs
        h = x
        for w, out in zip(ws, hs):
            torch.matmul(h, w.mT, out=out)  # (rows, width)
            h = out
        outs = [h @ heads.mT, gh.mT @ h]  # heads: forward, weight gradient
        dh = gh @ heads  # heads: input gradient (rows, width)
        for k in range(depth - 1, -1, -1):
            inp = x if k == 0 else hs[k - 1]
            outs.append(dh.mT @ inp)  # weight gradient (width, in)
            if k > 0:
                dh = dh @ ws[k]  # input gradient (rows, width)
        return outs

    def once():
        return [update(*data[b]) for b in sizes]

    with arithmetic("highest"):
        return timed(once, _timer(dev), repeats)


def epoch_flops(settings: Settings, x, y, weights) -> None:
    """torch has no cost analysis of a whole epoch: the benchmark takes XLA's or counts
    the products."""
    return None


def program_memory(settings: Settings, x, y, weights,
                   options: EngineOptions = EngineOptions()) -> None:
    """torch plans no buffers ahead: its memory is measured while it runs."""
    return None


def activation_bytes(settings: Settings, x, y, weights) -> int:
    """Bytes that the backward pass of one epoch keeps: autograd's saved tensors (distinct
    storages, parameters and inputs excluded), or `no-autograd`'s own buffers."""
    dev = resolve_device(settings.device)
    model = put(weights, settings.dtype, dev, settings.width, settings.depth)
    xs, ys = to_device(x, dev), to_device(y, dev)
    loop = default_loop(dev.type, settings, len(x)) if settings.loop == "auto" else settings.loop
    if loop == "no-autograd":
        return handgrad.activation_bytes(model, xs)
    own = {p.untyped_storage().data_ptr() for p in model.parameters()}
    own |= {xs.untyped_storage().data_ptr(), ys.untyped_storage().data_ptr()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward_loss(model, xs, ys, settings.full, settings.remat, settings.loss,
                            settings.beta)
    total = sum(seen.values())
    del loss
    return total


def reset_peak(device: str) -> None:
    """Hand cached blocks back and count the CUDA allocator's peak afresh."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def peak_bytes(device: str) -> int | None:
    """The caching allocator's peak since reset_peak (CUDA); None where there is none."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        return int(torch.cuda.max_memory_allocated(dev))
    return None


def release(device: str) -> None:
    """The caching allocator's free blocks back to CUDA, so that the next measurement (or
    the other framework) finds the memory free."""
    if resolve_device(device).type == "cuda":
        torch.cuda.empty_cache()


def set_threads(threads: int) -> None:
    """torch's intra-op threads (OpenMP, MKL)."""
    torch.set_num_threads(threads)
