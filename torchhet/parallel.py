"""Data-parallel torch (--devices N): N processes under `torch.distributed` (gloo on a
CPU, NCCL on CUDA), each with the whole data and the model wrapped in
`DistributedDataParallel`; mirrors jaxhet/parallel.py.

Every process runs the same epochs in the same batch order. Of each batch of b points,
process r takes its share (hetcore.schedule.shard_bounds: blocks of ceil(b / N) points,
the last ones shorter or empty) and its loss is the sum of its points' losses over b;
DDP's gradient all-reduce is made a plain sum (a comm hook: DDP's own divides by N,
which would be the mean of the shares' means, not the batch's mean when they are
uneven), so every process holds the batch's mean gradient, and one more all-reduce of the
shares' losses gives each the batch's loss. The optimiser then makes the same update in
each process, and the weights never part.

The processes are started by the train command itself (hetapps.launch) or by `torchrun`;
either way they meet through torch's environment variables (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT, LOCAL_RANK).
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from hetcore.errors import UsageError
from hetcore.schedule import shard_bounds

# Every wait on another process (joining, each collective) ends after this long: a worker
# that dies or hangs ends the run with one line, never a hang.
TIMEOUT_S = 120
ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def environment() -> dict | None:
    """torch.distributed's environment variables (None when WORLD_SIZE is not set), checked
    to be complete and consistent; UsageError naming the one that is not."""
    if "WORLD_SIZE" not in os.environ:
        return None
    missing = [k for k in ENV if not os.environ.get(k)]
    if missing:
        raise UsageError(f"torchrun environment: WORLD_SIZE is set but {', '.join(missing)} "
                         "is not")
    env = {}
    for k in ("RANK", "WORLD_SIZE", "MASTER_PORT", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        raw = os.environ.get(k, os.environ["RANK"] if k == "LOCAL_RANK" else
                             os.environ["WORLD_SIZE"] if k == "LOCAL_WORLD_SIZE" else "")
        try:
            env[k] = int(raw)
        except ValueError:
            raise UsageError(f"torchrun environment: {k}={raw!r} is not an integer") from None
    if env["WORLD_SIZE"] < 1 or not 0 <= env["RANK"] < env["WORLD_SIZE"]:
        raise UsageError(f"torchrun environment: RANK={env['RANK']} is not below "
                         f"WORLD_SIZE={env['WORLD_SIZE']}")
    if not 0 <= env["LOCAL_RANK"] < env["LOCAL_WORLD_SIZE"]:
        raise UsageError(f"torchrun environment: LOCAL_RANK={env['LOCAL_RANK']} is not below "
                         f"LOCAL_WORLD_SIZE={env['LOCAL_WORLD_SIZE']}")
    if not 0 < env["MASTER_PORT"] < 65536:
        raise UsageError(f"torchrun environment: MASTER_PORT={env['MASTER_PORT']} is not a "
                         "port")
    env["MASTER_ADDR"] = os.environ["MASTER_ADDR"]
    return env


def initialize(device: torch.device) -> int:
    """Join the processes of the environment (environment()); returns this one's rank. A
    CPU's threads are shared out among the processes on this machine."""
    if dist.is_initialized():
        return dist.get_rank()
    env = environment()
    if env is None:
        raise UsageError("--devices: torch's processes meet through torch.distributed's "
                         "environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); start "
                         "them with the train command or torchrun")
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(local_device(device))
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // env["LOCAL_WORLD_SIZE"]))
    try:
        dist.init_process_group("nccl" if cuda else "gloo",
                                timeout=datetime.timedelta(seconds=TIMEOUT_S))
    except (RuntimeError, ValueError) as e:  # a port in use, a master that never came
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"torch.distributed: could not join {env['WORLD_SIZE']} processes at "
                         f"{env['MASTER_ADDR']}:{env['MASTER_PORT']} ({first})") from None
    return dist.get_rank()


def check_count(device: torch.device, count: int) -> None:
    """Refuse, before any process starts, more processes than there are devices: CUDA
    devices on a GPU machine, cores on a CPU (each process needs one)."""
    if device.type == "cuda":
        have, what = torch.cuda.device_count(), "CUDA devices"
    else:
        have, what = os.cpu_count() or 1, "CPU cores"
    if count > have:
        raise UsageError(f"--devices {count}: torch runs one process a device, and this "
                         f"machine has {have} {what}")


def local_device(device: torch.device) -> torch.device:
    """This process's device: CUDA device LOCAL_RANK on a GPU machine, else the CPU."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _sum_hook(state, bucket):
    """DDP's all-reduce of a gradient bucket as a plain sum (DDP's default divides by the
    process count)."""
    work = dist.all_reduce(bucket.buffer(), async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


class _Share(torch.nn.Module):
    """This process's share of a batch: the sum of its points' losses over the batch's
    size."""

    def __init__(self, model, forward, point_loss):
        super().__init__()
        self.model, self._forward, self._point_loss = model, forward, point_loss

    def forward(self, x, y, batch: int, full: bool, remat: bool, loss: str, beta):
        mu, var = self._forward(self.model, x, remat)
        return self._point_loss(loss, mu, var, y, full, beta).sum() / batch


def data_parallel(model, device: torch.device, frozen: list, forward, point_loss):
    """(forward_loss, report) for torchhet.engine.make_runner: forward_loss(model, xb, yb,
    full, remat, loss, beta) runs this process's share of the batch through DDP (its
    backward all-reduces the gradient as a sum); report(value) is the batch's loss, the
    shares' sum. `frozen`: parameters the loss never reaches (an MSE run's variance head),
    kept out of DDP, whose reducer would wait for their gradients forever."""
    for p in frozen:
        p.requires_grad_(False)
    rank, world = dist.get_rank(), dist.get_world_size()
    ddp = torch.nn.parallel.DistributedDataParallel(
        _Share(model, forward, point_loss),
        device_ids=[device.index] if device.type == "cuda" else None)
    ddp.register_comm_hook(None, _sum_hook)

    def forward_loss(_model, xb, yb, full, remat, loss, beta):
        lo, hi = shard_bounds(xb.shape[0], world, rank)
        return ddp(xb[lo:hi], yb[lo:hi], xb.shape[0], full, remat, loss, beta)

    def report(value):
        total = value.detach().clone()
        dist.all_reduce(total)
        return total

    return forward_loss, report


def gather(obj) -> list:
    """Every process's `obj`, in rank order (pickled; small things: a chunk's losses, an
    ensemble's weights)."""
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return parts
