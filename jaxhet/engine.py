"""The JAX engine: a run's epochs as jit-compiled programs; mirrors torchhet/engine.py.

Loops, each a way to run the same epoch:
- `scan`: a chunk of epochs is one compiled `lax.scan` (the default: one dispatch and one
  host sync per chunk, weights donated so XLA updates them in place); in a mini-batch run
  each epoch is itself a scan over its batches, inside the same program, the epochs'
  orders passed in with the chunk (no host round trip per batch);
- `step`: one jit-compiled epoch per Python call, for comparison.

A run is a pure function of (settings, data, initial weights, batch orders): the compiled
programs take weights, data, the epochs' orders and the optimiser's scalars (learning rate,
its end value, momentum, weight decay, beta) as arguments, so new values never recompile;
only the architecture, dtype, point count, batch size, loss, optimiser and schedule shape,
chunk length and the engine's options are compiled in (EpochConfig).

Failures are found inside the compiled loop. The carry is (params, opt_state, failed),
`failed` the int32 index of the first update (counted over the run, batches per epoch
times the epoch plus the batch) whose loss or result was not finite (-1 while there is
none): from that update on the weights stay those of the last finite step and later
updates do nothing, so the host reads the failed epoch and batch exactly with the chunk's
losses, and never has to replay anything. The host reads chunk c-1 while chunk c runs
(`in_flight = 2`): the copies of losses and `failed` in a chunk's output survive the
carry's donation to the next chunk.

`remat=True` checkpoints the trunk in about sqrt(depth) segments (`jax.checkpoint`,
nothing saved inside a segment): the backward pass recomputes a segment's activations
instead of keeping them; less memory, one more trunk forward.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from hetcore.backend import Chunk, EngineOptions, Final, Prediction
from hetcore.errors import UsageError
from hetcore.schedule import chunk_length, remat_segments, shard_bounds
from hetcore.settings import LOOPS as ALL_LOOPS
from hetcore.settings import Settings
from jaxhet import optim, parallel
from jaxhet.device import x64_tracing
from jaxhet.model import PRECISIONS, point_loss, training_loss
from jaxhet.weights import put, to_state_dict

LOOPS = ALL_LOOPS["jax"]  # named once, in hetcore.settings

# The loop that finishes a run soonest, compile time included, on every platform (from
# scripts/bench.py's figures, docs/performance.md): `scan` and `step` compile in about the
# same time, and the whole chunk as one program is at least as fast as a Python-driven step
# on a CPU; on a GPU (reasoned, not yet measured) it also removes the per-epoch dispatch
# that would dominate an epoch of a few tens of microseconds.
DEFAULT_LOOP = "scan"

def _forward(model, x, remat: bool, paired: bool = False):
    if paired:  # the first two layers' products in the layouts a CPU takes fastest
        return model.paired(x)
    if not remat:
        return model(x)
    mods = list(model.layers.layers)  # Linear, relu, Linear, relu, ...

    def run(h, part):
        for m in part:
            h = m(h)
        return h

    h = x
    for start, stop in remat_segments(len(mods) // 2):
        part = mods[2 * start:2 * stop]
        # Nothing inside the segment is saved: the backward pass recomputes it from `h`.
        h = jax.checkpoint(lambda h, part=part: run(h, part))(h)
    return model.heads(h)


def loss_fn(params, graphdef, x, y, full: bool, remat: bool = False, loss: str = "nll",
            beta=None, paired: bool = False):
    """The training loss of the parameters on x, y (model.training_loss)."""
    mu, var = _forward(nnx.merge(graphdef, params), x, remat, paired)
    return training_loss(loss, mu, var, y, full, beta)


@dataclass(frozen=True)
class EpochConfig:
    """What a compiled epoch is built for (static: it keys the compiled programs)."""

    loss: str
    full: bool
    remat: bool
    opt: optim.OptConfig
    n_points: int
    batch: int  # points per batch; the last one of an epoch holds what is left
    batches: int  # batches (updates) per epoch
    devices: int = 1  # > 1: the program runs inside a shard_map over that many (parallel)
    paired: bool = False  # the first two layers as model.first_pair (paired_layers)


# XLA's float32 CPU products through Eigen rather than YNNPACK (XLA's default for them):
# faster for the products of 250 to 1,000 rows at widths up to 128 (a mini-batch's), slower
# or level elsewhere, the lecture's included (a sweep over widths and batch sizes,
# docs/performance.md, 2026-12-03 evening). Both run such small products on one thread.
EIGEN_DOTS = {"xla_cpu_experimental_ynn_fusion_type": ""}
EIGEN_MAX_WIDTH = 128
EIGEN_ROWS = range(250, 1001)


def _device(dev):
    """The (first) device of a device or a mesh sharding."""
    return dev.mesh.devices.flat[0] if hasattr(dev, "mesh") else dev


def dot_options(dtype: str, width: int, rows: int, dev) -> dict | None:
    """XLA options for a one-model program whose products have `rows` rows (a whole
    batch, or a device's share of one: a shorter last batch takes the same options, the
    program's) at `width`: EIGEN_DOTS where they are faster, else None."""
    if (_device(dev).platform == "cpu" and dtype == "float32" and width <= EIGEN_MAX_WIDTH
            and rows in EIGEN_ROWS):
        return EIGEN_DOTS
    return None


def paired_layers(depth: int, remat: bool, dev) -> bool:
    """Whether the first two layers train as jaxhet.model.first_pair (their forward is the
    model's own; their backward takes w2's gradient as a canonical product): on a CPU,
    where XLA takes that product from the (points, width) layout as a slower library's
    call, for one model, a mini-batch and an ensemble's members alike (docs/performance.md,
    2026-12-03 evening). Not with remat, whose segments save nothing inside them (the pair
    keeps its own residuals), and not on a GPU, whose products take transposed operands as
    they come."""
    return _device(dev).platform == "cpu" and depth >= 2 and not remat


def epoch_config(settings: Settings, n_points: int, dev) -> EpochConfig:
    """The compiled epoch's configuration for a run's settings on `dev` (its device or
    mesh sharding: parallel.placement)."""
    batch = n_points if settings.full_batch(n_points) else settings.batch_size
    return EpochConfig(settings.loss, settings.full, settings.remat,
                       optim.config(settings, n_points), n_points, batch,
                       settings.batches(n_points), settings.devices,
                       paired_layers(settings.depth, settings.remat, dev))


def shard_value_and_grad(params, graphdef, cfg: EpochConfig, x, y, h):
    """Inside the mesh's shard_map: the loss and gradient of the batch x, y from this
    device's share of it (hetcore.schedule.shard_bounds: blocks of ceil(b / devices) points,
    padded past the batch's end and masked), each device's sum of its points' losses over
    the batch size b, summed over the devices by one psum."""
    b = x.shape[0]
    size = -(-b // cfg.devices)
    pos = jax.lax.axis_index(parallel.AXIS) * size + jnp.arange(size)
    keep = (pos < b)[:, None]
    idx = jnp.minimum(pos, b - 1)
    xs, ys = x[idx], y[idx]

    def share(params):
        mu, var = _forward(nnx.merge(graphdef, params), xs, cfg.remat, cfg.paired)
        terms = point_loss(cfg.loss, mu, var, ys, cfg.full, h["beta"])
        return jnp.sum(jnp.where(keep, terms, jnp.zeros_like(terms))) / b

    return jax.lax.psum(jax.value_and_grad(share)(params), parallel.AXIS)


def new_carry(params, opt_state, device):
    """The loops' carry at the start of a run: nothing has failed yet."""
    return (params, opt_state, jax.device_put(jnp.asarray(-1, jnp.int32), device))


def update(graphdef, cfg: EpochConfig, carry, x, y, h, active, t):
    """Update t (counted over the run) on the batch x, y; `active` false (a masked tail
    epoch) or an earlier failure leaves the carry as is. `failed` becomes t at the first
    update whose loss or result is not finite (see the module docstring)."""
    params, opt_state, failed = carry
    ok = failed < 0
    tx = optim.transform(cfg.opt, h)
    if cfg.devices == 1:
        loss, grads = jax.value_and_grad(loss_fn)(params, graphdef, x, y, cfg.full,
                                                  cfg.remat, cfg.loss, h["beta"], cfg.paired)
    else:
        loss, grads = shard_value_and_grad(params, graphdef, cfg, x, y, h)
    # torch rounds three times: the gradient, `grad * lr`, then `param - that`. The barriers
    # keep XLA from folding lr into the gradient's matrix product (a GEMM's alpha) or the
    # product and the difference into one FMA, as a GPU backend may; a CPU does neither.
    grads = jax.lax.optimization_barrier(grads)
    updates, new_opt_state = tx.update(grads, opt_state, params)
    updates = jax.lax.optimization_barrier(updates)
    new_params = optax.apply_updates(params, updates)
    # A finite loss whose update makes a weight inf or nan is refused too (one reduction,
    # fused with the update).
    finite = jnp.isfinite(loss) & jnp.all(jnp.stack(
        [jnp.isfinite(leaf).all() for leaf in jax.tree.leaves(new_params)]))
    apply = ok & active & finite
    keep = lambda new, old: jnp.where(apply, new, old)  # noqa: E731
    params = jax.tree.map(keep, new_params, params)
    opt_state = jax.tree.map(keep, new_opt_state, opt_state)
    failed = jnp.where(ok & active & ~finite, jnp.asarray(t, failed.dtype), failed)
    return (params, opt_state, failed), loss


def epoch(graphdef, cfg: EpochConfig, carry, x, y, h, active, index, order=None):
    """Epoch `index`: one update on every point, or (a mini-batch run) the points in
    `order` in consecutive batches, one update each, the last batch shorter. Returns the
    carry and (the epoch's loss, the carry's `failed`): the point-weighted mean of the
    batches' losses, each taken before its own update."""
    if cfg.batches == 1:
        carry, loss = update(graphdef, cfg, carry, x, y, h, active, index)
        return carry, (loss, carry[2])
    b, n = cfg.batch, cfg.n_points
    whole = n // b  # batches of b points; a shorter one after them if b does not divide n
    xe, ye = x[order], y[order]  # the epoch's points in its order, gathered once
    first_t = index * cfg.batches

    def body(carry, part):
        xb, yb, k = part
        return update(graphdef, cfg, carry, xb, yb, h, active, first_t + k)

    carry, losses = jax.lax.scan(
        body, carry, (xe[:whole * b].reshape(whole, b, 1), ye[:whole * b].reshape(whole, b, 1),
                      jnp.arange(whole, dtype=jnp.int32)))
    total = jnp.sum(losses) * b
    if n > whole * b:
        carry, last = update(graphdef, cfg, carry, xe[whole * b:], ye[whole * b:], h, active,
                             first_t + whole)
        total = total + last * (n - whole * b)
    return carry, (total / n, carry[2])


def _scan_chunk(graphdef, length: int, cfg: EpochConfig, unroll: int, carry, x, y, h, orders,
                n_active, start):
    """`length` epochs from epoch `start` as one lax.scan; those from `n_active` on are
    masked. `orders`: (length, N) each epoch's order (None: full batch)."""

    def body(carry, part):
        i, order = part
        return epoch(graphdef, cfg, carry, x, y, h, i < n_active, start + i, order)

    return jax.lax.scan(body, carry, (jnp.arange(length, dtype=jnp.int32), orders),
                        unroll=unroll)


def _sharded_scan_chunk(graphdef, length: int, cfg: EpochConfig, unroll: int, mesh, carry,
                        x, y, h, orders, n_active, start):
    """_scan_chunk on every device of `mesh` at once (jaxhet.parallel): everything in and
    out replicated, each update's psum keeping it so."""
    chunk = functools.partial(_scan_chunk, graphdef, length, cfg, unroll)
    spec = jax.sharding.PartitionSpec()
    return jax.shard_map(chunk, mesh=mesh, in_specs=spec, out_specs=spec,
                         check_vma=False)(carry, x, y, h, orders, n_active, start)


def _step(graphdef, cfg: EpochConfig, carry, x, y, h, active, index, order):
    """One epoch; also returns the next epoch's index, so that the host feeds the device
    its own counter back instead of sending a scalar every epoch."""
    carry, out = epoch(graphdef, cfg, carry, x, y, h, active, index, order)
    return carry, out, index + 1


def _predict(graphdef, loss: str, full: bool, params, x, y, beta):
    mu, var = nnx.merge(graphdef, params)(x)
    return mu, var, training_loss(loss, mu, var, y, full, beta)


_scan_jit = jax.jit(_scan_chunk, static_argnums=(0, 1, 2, 3), donate_argnums=(4,))
_sharded_scan_jit = jax.jit(_sharded_scan_chunk, static_argnums=(0, 1, 2, 3, 4),
                            donate_argnums=(5,))
_step_jit = jax.jit(_step, static_argnums=(0, 1), donate_argnums=(2,))
predict_jit = jax.jit(_predict, static_argnums=(0, 1, 2))

_compiled: dict = {}


def signature(tree) -> tuple:
    return tuple((leaf.shape, str(leaf.dtype)) for leaf in jax.tree.leaves(tree))


def compile_once(fn, key, *args, options: dict | None = None):
    """Ahead-of-time compile, cached by what shapes the program (never by values) and by
    `options`, XLA compiler options for this program alone. An XLA that does not know an
    option (an older jaxlib) compiles the program without them."""
    if options:
        key = (*key, tuple(sorted(options.items())))
    if key not in _compiled:
        with x64_tracing():  # the same program whatever the process's x64 mode
            _compiled[key] = compile_lowered(fn.lower(*args), options)
    return _compiled[key]


def compile_lowered(lowered, options: dict | None = None):
    """lowered.compile() with XLA compiler options where this XLA knows them."""
    try:
        return lowered.compile(compiler_options=options)
    except jax.errors.JaxRuntimeError as e:
        if not options or not any(name in str(e) for name in options):
            raise
        return lowered.compile()


def make_runner(loop: str, graphdef, cfg: EpochConfig, length: int, carry, x, y, h, device,
                unroll: int = 1, options: dict | None = None):
    """(runner, compiled program) for `loop`: `runner(carry, n, start, orders) -> (carry,
    losses, failed)` runs the n epochs from epoch `start` (orders: their (n, N) orders, or
    None for full batches); `losses` and `failed` are device arrays whose first n entries
    are the chunk's losses and, after each epoch, the carry's `failed`. Nothing is read
    back to the host. `options`: XLA's, for the program (dot_options)."""
    sig = signature((carry, x, y, h))
    batched = cfg.batches > 1
    if loop == "scan":
        # a strongly typed scalar: the compiled programs take int32; a data-parallel one
        # takes its host inputs replicated on the mesh (`device` is then its sharding)
        i32 = np.int32 if cfg.devices == 1 else (
            lambda v: jax.device_put(np.asarray(v, np.int32), device))
        unroll = max(1, min(unroll, length))
        key = ("scan", graphdef, length, cfg, unroll, sig, device)
        example = i32(np.zeros((length, cfg.n_points), np.int32)) if batched else None
        if cfg.devices == 1:
            chunk = compile_once(_scan_jit, key, graphdef, length, cfg, unroll, carry, x, y,
                                 h, example, i32(length), i32(0), options=options)
        else:
            chunk = compile_once(_sharded_scan_jit, key, graphdef, length, cfg, unroll,
                                 device.mesh, carry, x, y, h, example, i32(length), i32(0),
                                 options=options)

        def runner(carry, n, start, orders=None):
            if batched:  # the masked tail's epochs take the chunk's last order again
                orders = i32(np.concatenate([orders, np.repeat(orders[-1:], length - n, 0)]))
            carry, (losses, failed) = chunk(carry, x, y, h, orders, i32(n), i32(start))
            return carry, losses, failed

        return runner, chunk
    i32 = np.int32
    on = jax.device_put(jnp.asarray(True), device)
    key = ("step", graphdef, cfg, sig, device)
    example = np.zeros(cfg.n_points, np.int32) if batched else None
    step = compile_once(_step_jit, key, graphdef, cfg, carry, x, y, h, on,
                        jax.device_put(i32(0), device), example, options=options)

    def runner(carry, n, start, orders=None):
        out = []
        index = jax.device_put(i32(start), device)  # one transfer per chunk
        for i in range(n):
            carry, loss_failed, index = step(carry, x, y, h, on, index,
                                             orders[i] if batched else None)
            out.append(loss_failed)
        losses, failed = (jnp.stack(v) for v in zip(*out))
        return carry, losses, failed

    return runner, step


def predict_programs(fn, graphdef, cfg: EpochConfig, params, h, device, x, y,
                     held_out=None) -> dict:
    """{"train": (x, y, program), "held": ...}: the compiled prediction `fn` (mu, var and
    the training loss) on the training data and, when given, the held-out data, both on
    the device; `fn` is predict_jit or an ensemble's vmapped one."""
    data = {"train": (x, y)} | ({} if held_out is None else {"held": held_out})
    programs = {}
    for name, (px, py) in data.items():
        px, py = jax.device_put(px, device), jax.device_put(py, device)
        key = (fn, graphdef, cfg.loss, cfg.full, signature((params, px, py, h)), device)
        programs[name] = (px, py, compile_once(fn, key, graphdef, cfg.loss, cfg.full, params,
                                               px, py, h["beta"]))
    return programs


def predict_on(programs: dict, name: str, params, h):
    """(mu, var, loss) of `params` on the data `name` of predict_programs, on the device."""
    px, py, program = programs[name]
    return program(params, px, py, h["beta"])


def opt_leaves(opt_state) -> dict[str, np.ndarray]:
    """An optimiser state's leaves as host arrays named '0', '1', ...: a checkpoint's."""
    return {str(i): np.asarray(a) for i, a in enumerate(jax.tree.leaves(opt_state))}


def restore_opt_state(opt_state, optimizer: dict, device):
    """A checkpoint's optimiser state (flattened leaves named '0', '1', ...) in the tree of
    `opt_state`, checked leaf by leaf; a misfit is a UsageError naming the leaf."""
    leaves, tree = jax.tree.flatten(opt_state)
    if len(optimizer) != len(leaves):
        raise UsageError(f"--resume: optimizer state has {len(optimizer)} tensors, "
                         f"expected {len(leaves)}")
    saved = [np.asarray(optimizer.get(str(i))) for i in range(len(leaves))]
    for i, (a, leaf) in enumerate(zip(saved, leaves)):
        if a.shape != leaf.shape or a.dtype != leaf.dtype:
            raise UsageError(f"--resume: optimizer tensor '{i}' is {a.dtype} {a.shape}, "
                             f"expected {leaf.dtype} {leaf.shape}")
    return jax.device_put(jax.tree.unflatten(tree, saved), device)


class JaxEngine:
    """hetcore.backend.Engine for JAX (see the module docstring)."""

    in_flight = 2

    def __init__(self, settings: Settings, x: np.ndarray, y: np.ndarray, weights: dict,
                 optimizer: dict | None = None, options: EngineOptions = EngineOptions(),
                 held_out: tuple[np.ndarray, np.ndarray] | None = None):
        self.loop = DEFAULT_LOOP if settings.loop == "auto" else settings.loop
        if self.loop not in LOOPS:
            raise UsageError(f"--loop {self.loop}: not a jax loop; jax has auto, "
                             f"{', '.join(LOOPS)}")
        if options.unroll != 1 and self.loop != "scan":
            raise UsageError(f"unroll {options.unroll}: only the jax scan loop unrolls, not "
                             f"{self.loop}")
        dtype = settings.dtype
        # with --devices, every array replicated on the mesh (jaxhet.parallel)
        dev, self.device = parallel.placement(settings)
        t0 = time.perf_counter()
        self.graphdef, params = put(weights, dtype, dev, PRECISIONS[options.matmul_precision],
                                    settings.width, settings.depth)
        self.cfg = epoch_config(settings, x.shape[0], dev)
        self.h = jax.device_put({**optim.hyper(settings, dtype),
                                 "beta": np.asarray(settings.beta or 0.0, dtype)}, dev)
        # (placed: eager init makes its step counts on the default device, not the mesh)
        opt_state = jax.device_put(optim.transform(self.cfg.opt, self.h).init(params), dev)
        if optimizer is not None:
            opt_state = restore_opt_state(opt_state, optimizer, dev)
        self.carry = new_carry(params, opt_state, dev)
        self.x, self.y = jax.device_put(x, dev), jax.device_put(y, dev)
        length = chunk_length(settings.epochs, settings.chunk_epochs, settings.checkpoint_every)
        rows = shard_bounds(self.cfg.batch, self.cfg.devices, 0)[1]  # the largest share
        dots = dot_options(dtype, settings.width, rows, dev)
        self.runner, self.compiled = make_runner(self.loop, self.graphdef, self.cfg, length,
                                                 self.carry, self.x, self.y, self.h, dev,
                                                 options.unroll, dots)
        self.programs = predict_programs(predict_jit, self.graphdef, self.cfg, params, self.h,
                                         dev, self.x, self.y, held_out)
        self.compile_s = time.perf_counter() - t0

    def launch(self, start: int, count: int, orders=None):
        self.carry, losses, failed = self.runner(self.carry, count, start, orders)
        # Queued behind the chunk, read with it: the held-out loss of its final weights
        # (the next chunk's donation of them waits for this reader).
        held = (None if "held" not in self.programs
                else predict_on(self.programs, "held", self.carry[0], self.h)[2])
        return start, count, losses, failed, held

    def read(self, handle) -> Chunk:
        """The carry's `failed` names the update; an update whose loss was finite (the
        epoch's loss then is too) was refused for making the weights non-finite, and the
        weights stayed finite, so no later loss is non-finite."""
        start, count, losses, failed, held = handle
        losses = np.asarray(losses)[:count]
        t = int(np.asarray(failed)[count - 1])
        chunk = Chunk(losses, held_out_loss=None if held is None else float(held))
        if t < 0:
            return chunk
        e, batch = divmod(t, self.cfg.batches)
        return dataclasses.replace(chunk, failed=e, update_failed=bool(
            np.isfinite(losses[e - start])), batch=batch)

    def state(self):
        params, opt_state, _ = self.carry
        return to_state_dict(params), opt_leaves(opt_state)

    def wait(self) -> None:
        jax.block_until_ready(self.carry)

    def finish(self) -> Final:
        params = self.carry[0]
        mu, var, loss = predict_on(self.programs, "train", params, self.h)
        held = None
        if "held" in self.programs:
            hm, hv, hl = predict_on(self.programs, "held", params, self.h)
            held = Prediction(np.asarray(hm)[:, 0], np.asarray(hv)[:, 0], float(hl))
        return Final(to_state_dict(params), np.asarray(mu)[:, 0], np.asarray(var)[:, 0],
                     float(loss), held)
