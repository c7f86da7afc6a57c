"""An ensemble's JAX engine: K members' epochs as one compiled program, `jax.vmap` over
the members' stacked weights and optimiser states; mirrors torchhet/ensemble.py.

Member k is the single run of jaxhet.engine from its own initial weights and batch orders:
the vmapped function is that engine's own epoch (`jaxhet.engine.epoch`), each member
carrying its own parameters, optimiser state and failure index, sharing the data, the
compiled learning-rate schedule and the update count. A chunk of epochs is one `lax.scan`
of the vmapped epoch, so the K members cost one dispatch and one host sync per chunk, as
one model does, and XLA batches their products (K small products become batched ones).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from hetcore import interchange
from hetcore.backend import Chunk, EngineOptions, Final, Prediction
from hetcore.errors import UsageError
from hetcore.schedule import chunk_length
from hetcore.settings import Settings
from jaxhet import optim, parallel
from jaxhet.engine import (_device, _predict, compile_once, epoch, epoch_config, opt_leaves,
                           predict_on, predict_programs, restore_opt_state, signature)
from jaxhet.model import PRECISIONS
from jaxhet.weights import put, to_state_dict


def stack_trees(trees: list):
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def member_tree(tree, k: int):
    return jax.tree.map(lambda leaf: leaf[k], tree)


def _members_chunk(graphdef, length: int, cfg, unroll: int, members: str, carry, x, y, h,
                   orders, n_active, start):
    """`length` epochs of every member from epoch `start` (those from `n_active` on
    masked); orders: (length, K, N) each member's orders (None: full batch). members:
    "vmap", the members' products batched, or "map", the members one after another in
    the same program, each with one model's products (MEMBERS)."""

    def members_epoch(carry, active, index, order):
        one = lambda c, o: epoch(graphdef, cfg, c, x, y, h, active, index, o)  # noqa: E731
        if members == "map":
            return jax.lax.map(lambda part: one(*part), (carry, order))
        return jax.vmap(one, in_axes=(0, None if order is None else 0))(carry, order)

    def body(carry, part):
        i, order = part
        return members_epoch(carry, i < n_active, start + i, order)

    return jax.lax.scan(body, carry, (jnp.arange(length, dtype=jnp.int32), orders),
                        unroll=unroll)


def _members_predict(graphdef, loss: str, full: bool, params, x, y, beta):
    return jax.vmap(lambda p: _predict(graphdef, loss, full, p, x, y, beta))(params)


_chunk_jit = jax.jit(_members_chunk, static_argnums=(0, 1, 2, 3, 4), donate_argnums=(5,))
_predict_jit = jax.jit(_members_predict, static_argnums=(0, 1, 2))


# From this width on, the members run one after another ("map") rather than batched
# ("vmap"): XLA's CPU batched products fall behind its plain ones as the products grow.
# Measured on a 2-core CPU (scripts/bench.py --ensemble, docs/performance.md): width 64,
# 16 members, vmap 2.13 ms an epoch against map 3.12; width 512, 8 members, vmap 30.5 ms
# against map 21.0 (as fast as 8 single runs); 128 and 256 within the noise of each other.
MAP_FROM_WIDTH = 512


# XLA's CPU batched products run Eigen's product one member after another; YNNPACK's
# (XLA's "ynn" dot fusion, full float32, opt-in per program) run them batched: faster for
# an ensemble's members, no gain on one model nor at width 512 (docs/performance.md,
# 2026-12-02 evening), which therefore keep Eigen's; float64 products are not YNNPACK's.
YNN_DOTS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


def _batched_on_cpu(members: str, dev) -> bool:
    return members == "vmap" and _device(dev).platform == "cpu"


def compiler_options(dtype: str, members: str, dev) -> dict | None:
    """The ensemble program's XLA options: YNN_DOTS for vmapped float32 members on a CPU."""
    return YNN_DOTS if _batched_on_cpu(members, dev) and dtype == "float32" else None


def members_loop(settings: Settings, options: EngineOptions) -> str:
    """How the members' epochs run (see _members_chunk): vmap on a mesh, else
    options.members, or for "auto" the faster one for the width."""
    if settings.devices > 1:
        # the members' axis is sharded: a loop over it (map) would gather every member onto
        # every device; vmap's batched products are partitioned, each device its own
        return "vmap"
    if options.members != "auto":
        return options.members
    return "map" if settings.width >= MAP_FROM_WIDTH else "vmap"


class JaxEnsembleEngine:
    """hetcore.backend.Engine for an ensemble (settings.ensemble = K > 1) in JAX."""

    in_flight = 2

    def __init__(self, settings: Settings, x: np.ndarray, y: np.ndarray, weights: dict,
                 optimizer: dict | None = None, options: EngineOptions = EngineOptions(),
                 held_out: tuple[np.ndarray, np.ndarray] | None = None):
        self.loop = "scan"
        k, dtype = settings.ensemble, settings.dtype
        self.members = k
        # Where the data live (dev), and the members' weights and optimiser states (at):
        # with --devices N, the members' axis is split over a mesh (K / N members a device,
        # no communication: the members never meet), the data replicated.
        if settings.devices > 1 and jax.process_count() > 1:
            raise UsageError("--ensemble with --devices: the members are spread over one "
                             "process's devices; run an ensemble in one process")
        dev, self.device = parallel.placement(settings, parallel.MEMBERS)
        at = dev if settings.devices == 1 else \
            NamedSharding(dev.mesh, PartitionSpec(parallel.MEMBERS))
        t0 = time.perf_counter()
        puts = [put(w, dtype, dev, PRECISIONS[options.matmul_precision], settings.width,
                    settings.depth) for w in interchange.unstack(weights)]
        self.graphdef = puts[0][0]
        params = jax.device_put(stack_trees([p for _, p in puts]), at)
        self.members_loop = members_loop(settings, options)
        # every member's batches whole on its device: the points are not split
        self.cfg = dataclasses.replace(epoch_config(settings, x.shape[0], dev), devices=1)
        self.h = jax.device_put({**optim.hyper(settings, dtype),
                                 "beta": np.asarray(settings.beta or 0.0, dtype)}, dev)
        opt_state = jax.device_put(jax.vmap(optim.transform(self.cfg.opt, self.h).init)(params),
                                   at)
        if optimizer is not None:  # a checkpoint's: every member's, stacked
            opt_state = restore_opt_state(opt_state, optimizer, at)
        failed = jax.device_put(jnp.full((k,), -1, jnp.int32), at)
        self.carry = (params, opt_state, failed)
        self.x, self.y = jax.device_put(x, dev), jax.device_put(y, dev)
        self.length = chunk_length(settings.epochs, settings.chunk_epochs,
                                   settings.checkpoint_every)
        self.batched = self.cfg.batches > 1
        unroll = max(1, min(options.unroll, self.length))
        sig = signature((self.carry, self.x, self.y, self.h))
        # each epoch's orders, (length, K, N), with their members
        self.orders_at = (None if settings.devices == 1 else
                          NamedSharding(at.mesh, PartitionSpec(None, parallel.MEMBERS)))
        example = (self._orders(np.zeros((self.length, k, x.shape[0]), np.int32))
                   if self.batched else None)
        self.chunk = compile_once(_chunk_jit, ("members", self.graphdef, self.length, self.cfg,
                                               unroll, self.members_loop, sig, dev),
                                  self.graphdef, self.length, self.cfg, unroll,
                                  self.members_loop, self.carry,
                                  self.x, self.y, self.h, example, np.int32(self.length),
                                  np.int32(0),
                                  options=compiler_options(dtype, self.members_loop, dev))
        self.programs = predict_programs(_predict_jit, self.graphdef, self.cfg, params, self.h,
                                         dev, self.x, self.y, held_out)
        self.compile_s = time.perf_counter() - t0

    def _orders(self, orders: np.ndarray):
        return orders if self.orders_at is None else jax.device_put(orders, self.orders_at)

    def launch(self, start: int, count: int, orders=None):
        if self.batched:  # the masked tail's epochs take the chunk's last orders again
            orders = self._orders(np.concatenate(
                [orders, np.repeat(orders[-1:], self.length - count, 0)]))
        self.carry, (losses, failed) = self.chunk(self.carry, self.x, self.y, self.h, orders,
                                                  np.int32(count), np.int32(start))
        held = (None if "held" not in self.programs
                else jnp.mean(predict_on(self.programs, "held", self.carry[0], self.h)[2]))
        return start, count, losses, failed, held

    def read(self, handle) -> Chunk:
        """Each member's failure index names its first refused update; the chunk reports
        the earliest of them, and its member."""
        start, count, losses, failed, held = handle
        losses = np.asarray(losses)[:count]  # (count, K)
        t = np.asarray(failed)[count - 1]  # (K,)
        chunk = Chunk(losses, held_out_loss=None if held is None else float(held))
        if (t < 0).all():
            return chunk
        member = int(np.argmin(np.where(t < 0, np.iinfo(np.int32).max, t)))
        e, batch = divmod(int(t[member]), self.cfg.batches)
        return Chunk(losses, e, bool(np.isfinite(losses[e - start, member])), batch,
                     chunk.held_out_loss, member)

    def _weights(self) -> dict:
        params = self.carry[0]
        return interchange.stack([to_state_dict(member_tree(params, i))
                                  for i in range(self.members)])

    def state(self):
        return self._weights(), opt_leaves(self.carry[1])

    def wait(self) -> None:
        jax.block_until_ready(self.carry)

    def finish(self) -> Final:
        params = self.carry[0]
        mu, var, loss = predict_on(self.programs, "train", params, self.h)
        held = None
        if "held" in self.programs:
            hm, hv, hl = predict_on(self.programs, "held", params, self.h)
            held = Prediction(np.asarray(hm)[..., 0], np.asarray(hv)[..., 0], np.asarray(hl))
        return Final(self._weights(), np.asarray(mu)[..., 0], np.asarray(var)[..., 0],
                     np.asarray(loss), held)
