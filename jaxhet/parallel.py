"""Data-parallel JAX (--devices N): a one-axis `jax.sharding.Mesh` over N devices, the
weights and the data replicated on it, each batch's points split over it, and runs over
several processes (`jax.distributed`). An ensemble's mesh splits its members instead
(jaxhet.ensemble): each device trains ensemble / N whole members, and nothing is
communicated.

The training chunk is one `jax.shard_map` over the mesh (jaxhet.engine): every device
runs the same scan over epochs and batches on replicated weights, takes its own share of
each batch (hetcore.schedule.shard_bounds, by `lax.axis_index`), and sums its points'
losses over the batch's size; one `psum` of that sum and of its gradient gives every
device the batch's mean loss and gradient, and the same update. An uneven split (a batch
of 10 points on 4 devices is 3, 3, 3, 1) is padded and masked inside the program, so the
mean is always over the batch's own points. The data are replicated rather than split
because a mini-batch gathers its points by the epoch's order from the whole set; the
points' share of the work, the forward and backward passes, is what is split.
"""

from __future__ import annotations

import socket

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hetcore.errors import UsageError
from jaxhet.device import describe, resolve_device

AXIS = "points"  # the mesh's one axis: a batch's points split over it
MEMBERS = "members"  # an ensemble's mesh: its members split over it (jaxhet.ensemble)
# How long a process waits for the others at start-up (jax's default is 5 minutes), and
# how long without a heartbeat before another counts as lost (jax's default 100 s): a
# worker that never comes or dies ends the run, with one line, rather than a long hang.
JOIN_TIMEOUT_S = 120
HEARTBEAT_TIMEOUT_S = 30


def initialize(coordinator: str | None, num_processes: int | None,
               process_id: int | None) -> None:
    """Join a run over several processes (`jax.distributed.initialize`) before JAX starts
    its backends. coordinator "auto": process count and id from the cluster's environment
    (SLURM, Open MPI, Cloud TPU, as JAX detects them). On a CPU the processes talk over
    gloo."""
    if jax.distributed.is_initialized():
        return
    auto = coordinator == "auto"
    if not auto and process_id == 0:
        _check_port(coordinator)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address=None if auto else coordinator,
            num_processes=None if auto else num_processes,
            process_id=None if auto else process_id,
            initialization_timeout=JOIN_TIMEOUT_S,
            heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S)
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"--coordinator {coordinator}: jax could not join the processes "
                         f"({first})") from None


def _check_port(coordinator: str) -> None:
    """Process 0 serves the coordinator: its port must be free here (jax's own refusal of
    a port in use comes with a log line of gRPC's before it)."""
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--coordinator {coordinator}: expected HOST:PORT, or auto")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", int(port)))
        except OSError as e:
            raise UsageError(f"--coordinator {coordinator}: process 0 cannot listen on port "
                             f"{port} here ({e.strerror})") from None


def mesh(name: str, count: int, axis: str = AXIS) -> Mesh:
    """A one-axis mesh over the first `count` devices of --device `name`'s platform (across
    every process); UsageError listing those present when there are fewer."""
    first = resolve_device(name)
    present = jax.devices(first.platform)
    if len(present) < count:
        shown = ", ".join(describe(d) for d in present[:8]) + (", ..." if len(present) > 8
                                                                else "")
        hint = (" (on a CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N makes N)"
                if first.platform == "cpu" else "")
        raise UsageError(f"--devices {count}: jax has {len(present)} {first.platform} "
                         f"device(s): {shown}{hint}")
    if jax.process_count() > 1 and count != len(present):
        raise UsageError(f"--devices {count}: a run over {jax.process_count()} processes "
                         f"spans every device of each, {len(present)} in all")
    return Mesh(np.array(present[:count]), (axis,))


def replicated(m: Mesh) -> NamedSharding:
    """Where the weights, the data and every scalar of a data-parallel run live: whole on
    each device of the mesh."""
    return NamedSharding(m, PartitionSpec())


def describe_mesh(m: Mesh) -> str:
    d = m.devices.ravel()
    procs = jax.process_count()
    over = f", {procs} processes" if procs > 1 else ""
    return f"{describe(d[0])} and {len(d) - 1} more ({len(d)} devices{over})"


def placement(settings, axis: str = AXIS):
    """(where, description) of an engine's arrays: the device of --device, or with
    --devices N the replicated sharding of a mesh over N devices along `axis`."""
    if settings.devices == 1:
        dev = resolve_device(settings.device)
        return dev, describe(dev)
    m = mesh(settings.device, settings.devices, axis)
    return replicated(m), describe_mesh(m)
