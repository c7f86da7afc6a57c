"""An ensemble's torch engine: K members trained together through torch.func; mirrors
jaxhet/ensemble.py.

The members' parameters are stacked (`torch.func.stack_module_state`: one leaf tensor per
parameter name with a leading member axis), and one forward pass of all K is
`torch.func.vmap` over `torch.func.functional_call` of one stateless copy of the model.
The sum of the members' losses is differentiated once: member k's loss depends on member
k's slice alone, so each slice's gradient is that member's own. The update is the single
run's: the lecture's `p -= g * lr` for plain SGD, torch.optim otherwise (every optimiser
here is element-wise, and Adam's step count is shared, as the members' updates are), and a
parameter without a gradient (an MSE run's variance head) is not updated at all.

Failures are found as torchhet.engine finds them: once per chunk the losses and weights
are checked, and a chunk that went bad is replayed update by update from a copy taken
before it, to name the first failed epoch, batch and member.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
from torch.func import functional_call, stack_module_state, vmap

from hetcore import interchange
from hetcore.backend import Chunk, EngineOptions, Final, Prediction
from hetcore.errors import UsageError
from hetcore.schedule import batch_sizes, chunk_length
from hetcore.settings import Settings
from torchhet import optim, parallel, whole
from torchhet.device import arithmetic, describe, resolve_device, sync, to_device
from torchhet.engine import _lecture_update, over_batches, refuse_unroll, repays_compiling
from torchhet.model import training_loss
from torchhet.weights import DTYPES, put


class _Failed(Exception):
    def __init__(self, batch: int, member: int, update: bool):
        self.batch, self.member, self.update = batch, member, update


class TorchEnsembleEngine:
    """hetcore.backend.Engine for an ensemble (settings.ensemble = K > 1) in torch."""

    in_flight = 1
    loop = "func"

    def __init__(self, settings: Settings, x: np.ndarray, y: np.ndarray, weights: dict,
                 optimizer: dict | None = None, options: EngineOptions = EngineOptions(),
                 held_out: tuple[np.ndarray, np.ndarray] | None = None,
                 device: torch.device | None = None):
        """device: where the members train (default: settings.device's); a process of
        TorchEnsembleOverProcesses gives its own."""
        refuse_unroll(options)
        if options.members != "auto":
            raise UsageError(f"members {options.members}: torch's ensemble has one way, "
                             "torch.func.vmap")
        t0 = time.perf_counter()
        s, dev = settings, device or resolve_device(settings.device)
        self.settings, self._dev, self.device = s, dev, describe(dev)
        self.precision, self.members = options.matmul_precision, s.ensemble
        models = [put(w, s.dtype, dev, s.width, s.depth) for w in interchange.unstack(weights)]
        params, _ = stack_module_state(models)
        self.names = list(params)
        self.params = {n: params[n].detach().clone().requires_grad_() for n in self.names}
        self.leaves = [self.params[n] for n in self.names]
        self.base = copy.deepcopy(models[0]).to("meta")  # the stateless module vmap calls
        self.x, self.y = to_device(x, dev), to_device(y, dev)
        self.held = None if held_out is None else tuple(to_device(a, dev) for a in held_out)
        n = x.shape[0]
        self.sizes = batch_sizes(n, None if s.full_batch(n) else s.batch_size)
        self.schedule = optim.Schedule(s, n)
        self.opt, self.compiled = None if s.plain_sgd else optim.make(s, self.leaves, dev), None
        if s.loop == "compile-update" or (s.loop == "auto" and s.devices == 1 and
                                          repays_compiling(dev.type, s, n)):
            # the members' updates compiled whole (whole.py), the optimiser over the trained
            # parameters alone, plain SGD's too (its functional step reads its settings)
            trained, fixed = whole.split(self.params, s.loss)
            self.opt = optim.make(s, [self.params[name] for name in trained], dev)
            self.compiled = whole.Updates(
                self._value(trained, fixed), [self.params[name].detach() for name in trained],
                [self.params[name].detach() for name in fixed], self.opt, s, n,
                self.members * self.sizes[0], dim=1)
            self.loop = "compile-update"
        if optimizer:  # a checkpoint's: every member's, stacked
            if self.opt is None:
                raise UsageError(f"--resume: optimizer state has {len(optimizer)} tensors, "
                                 "expected none (plain SGD)")
            try:
                optim.load(self.opt, self.names, optimizer, dev)
            except (KeyError, ValueError, RuntimeError) as e:
                raise UsageError(f"--resume: optimizer state does not fit --optimizer "
                                 f"{s.optimizer} ({e})") from None
        self.length = chunk_length(s.epochs, s.chunk_epochs, s.checkpoint_every)
        self.losses = torch.empty(self.length, self.members, dtype=DTYPES[s.dtype], device=dev)
        if self.compiled is not None:
            # the run's own inputs, two tensors as in the run (one tensor passed twice
            # would compile a graph that the run's calls do not take)
            xs, ys = (self.x, self.y) if s.full_batch(n) else \
                (a[None].repeat(self.members, 1, 1) for a in (self.x, self.y))
            with arithmetic(self.precision):  # as every run of it
                self.compiled.warm(whole.warm_calls(xs, ys, s, self.sizes, dim=1))
        self.compile_s = time.perf_counter() - t0

    def _value(self, trained: list[str], fixed: list[str]):
        """The compiled update's value (whole.Updates): the sum of the members' losses, and
        the (K,) losses, on a batch shared by every member or one of each member's own."""
        s = self.settings

        def member(p, xs, ys):
            mu, var = functional_call(self.base, p, (xs,))
            return training_loss(s.loss, mu, var, ys, s.full, s.beta)

        def value(ps, qs, xb, yb, same):
            weights = {**dict(zip(trained, ps)), **dict(zip(fixed, qs))}
            losses = vmap(member, in_dims=(0, None, None) if same else (0, 0, 0))(
                weights, xb, yb)
            return losses.sum(), losses

        return value

    def _losses(self, xb, yb, shared: bool) -> torch.Tensor:
        """(K,) each member's loss on its batch (xb, yb: (K, B, 1), or (B, 1) shared)."""
        s = self.settings

        def member(p, xs, ys):
            mu, var = functional_call(self.base, p, (xs,))
            return training_loss(s.loss, mu, var, ys, s.full, s.beta)

        axes = (0, None, None) if shared else (0, 0, 0)
        return vmap(member, in_dims=axes)(self.params, xb, yb)

    def _step(self, xb, yb, t: int, shared: bool) -> torch.Tensor:
        """Update t of every member on its batch; returns the (K,) losses before it."""
        if self.compiled is not None:
            return self.compiled(xb, yb, t, xb.shape[-2], 1, shared)[0]
        for p in self.leaves:
            p.grad = None
        values = self._losses(xb, yb, shared)
        values.sum().backward()  # member k's slice gets member k's own gradient
        if self.opt is None:
            _lecture_update([p for p in self.leaves if p.grad is not None], self.schedule(t))
        else:
            self.schedule.set(self.opt, t)
            self.opt.step()
        return values.detach()

    def _epoch(self, e: int, order, check=None) -> torch.Tensor:
        """Epoch e of every member: the full batch, or each member's points in its order
        (K, N) in consecutive batches; (K,) point-weighted means of the batches' losses
        (torchhet.engine.over_batches, the single engine's sum). check(b, losses), if given, runs after every
        update (a replay's)."""
        t = e * len(self.sizes)
        if order is None:
            values = self._step(self.x, self.y, t, shared=True)
            if check is not None:
                check(0, values)
            return values
        idx = torch.from_numpy(np.asarray(order, np.int64)).to(self._dev)  # (K, N)
        xe, ye = self.x[idx], self.y[idx]  # (K, N, 1), gathered once
        if self.compiled is not None and check is None:
            values = whole.through_batches(self.compiled, xe, ye, t, self.sizes, dim=1)
            return over_batches(self.sizes, lambda start, size, b: values[b])
        return over_batches(self.sizes, lambda start, size, b: self._step(
            xe[:, start:start + size], ye[:, start:start + size], t + b, shared=False), check)

    def launch(self, start: int, count: int, orders=None):
        before = ([p.detach().clone() for p in self.leaves],
                  None if self.opt is None else copy.deepcopy(self.opt.state_dict()))
        with arithmetic(self.precision):
            if self.compiled is not None and orders is None:
                whole.full_batches(self.compiled, self.x, self.y, start, count, self.losses)
            else:
                for i in range(count):
                    self.losses[i] = self._epoch(start + i,
                                                 None if orders is None else orders[i])
            held = None if self.held is None else self._predict(*self.held)[2].mean()
        return start, count, orders, before, held

    def _finite(self) -> bool:
        return bool(torch.stack([torch.isfinite(p).all() for p in self.leaves]).all())

    def read(self, handle) -> Chunk:
        start, count, orders, before, held = handle
        losses = self.losses[:count].cpu().numpy().copy()  # (count, K)
        held = None if held is None else float(held)
        if np.isfinite(losses).all() and self._finite():
            return Chunk(losses, held_out_loss=held)
        params, opt_state = before
        with torch.no_grad():
            for p, b in zip(self.leaves, params):
                p.copy_(b)
        if opt_state is not None:
            self.opt.load_state_dict(opt_state)

        def check(b, values):
            bad = ~torch.isfinite(values)
            if bad.any():
                raise _Failed(b, int(torch.nonzero(bad)[0, 0]), False)
            for p in self.leaves:
                rows = ~torch.isfinite(p).reshape(self.members, -1).all(dim=1)
                if rows.any():
                    raise _Failed(b, int(torch.nonzero(rows)[0, 0]), True)

        with arithmetic(self.precision):
            for i in range(count):
                try:
                    self._epoch(start + i, None if orders is None else orders[i], check)
                except _Failed as f:
                    return Chunk(losses, start + i, f.update, f.batch, held, f.member)
        return Chunk(losses, start + count - 1, True, len(self.sizes) - 1, held, 0)

    def _predict(self, x, y):
        """(mu, var, loss) of every member on x, y: (K, M, 1), (K, M, 1), (K,)."""
        s = self.settings

        def member(p):
            mu, var = functional_call(self.base, p, (x,))
            return mu, var, training_loss(s.loss, mu, var, y, s.full, s.beta)

        with torch.no_grad():
            return vmap(member)({n: p.detach() for n, p in self.params.items()})

    def state(self):
        weights = {n: p.detach().cpu().numpy().copy() for n, p in self.params.items()}
        return weights, optim.state(self.opt, self.names)

    def wait(self) -> None:
        sync(self._dev)

    def finish(self) -> Final:
        with arithmetic(self.precision):
            mu, var, loss = self._predict(self.x, self.y)
            held = None
            if self.held is not None:
                hm, hv, hl = self._predict(*self.held)
                held = Prediction(hm[..., 0].cpu().numpy(), hv[..., 0].cpu().numpy(),
                                  hl.cpu().numpy())
        weights, _ = self.state()
        return Final(weights, mu[..., 0].cpu().numpy(), var[..., 0].cpu().numpy(),
                     loss.cpu().numpy(), held)


class TorchEnsembleOverProcesses:
    """hetcore.backend.Engine for an ensemble over processes (settings.ensemble = K,
    settings.devices = P > 1): process r trains members r*K/P .. (r+1)*K/P - 1 with a
    TorchEnsembleEngine of its own, from their own initial weights and in their own batch
    orders; the members never meet, so training communicates nothing. The chunks' losses
    and failures, the held-out loss, and at a checkpoint and the end the weights and
    predictions are gathered from every process (torchhet.parallel.gather), so that every
    process (process 0 writes) sees the whole ensemble."""

    in_flight = 1
    loop = "func"

    def __init__(self, settings: Settings, x: np.ndarray, y: np.ndarray, weights: dict,
                 optimizer: dict | None = None, options: EngineOptions = EngineOptions(),
                 held_out: tuple[np.ndarray, np.ndarray] | None = None):
        dev = parallel.local_device(resolve_device(settings.device))
        rank, world = parallel.initialize(dev), settings.devices
        k = settings.ensemble
        self.lo, self.hi = rank * k // world, (rank + 1) * k // world
        local = settings.replace(ensemble=self.hi - self.lo, devices=1)
        mine = interchange.stack(interchange.unstack(weights)[self.lo:self.hi])
        if optimizer:  # per-parameter state stacked over the members; step counts shared
            optimizer = {n: a[self.lo:self.hi] if np.ndim(a) else a
                         for n, a in optimizer.items()}
        self.local = TorchEnsembleEngine(local, x, y, mine, optimizer, options, held_out,
                                         device=dev)
        self.gather = parallel.gather
        self.device = f"{self.local.device}, process {rank} of {world} (members " \
                      f"{self.lo}..{self.hi - 1})"
        self.compile_s, self.members = self.local.compile_s, k

    def launch(self, start: int, count: int, orders=None):
        return self.local.launch(start, count,
                                 None if orders is None else orders[:, self.lo:self.hi])

    def read(self, handle) -> Chunk:
        c = self.local.read(handle)
        failure = None if c.failed is None else (c.failed, c.batch, self.lo + c.member,
                                                  c.update_failed)
        parts = self.gather((c.losses, failure, c.held_out_loss, self.hi - self.lo))
        losses = np.concatenate([p[0] for p in parts], axis=1)  # (count, K)
        held = None
        if parts[0][2] is not None:  # the members' mean: each process's mean, weighted
            held = float(sum(p[2] * p[3] for p in parts) / self.members)
        failures = [p[1] for p in parts if p[1] is not None]
        if not failures:
            return Chunk(losses, held_out_loss=held)
        e, batch, member, update = min(failures)  # the earliest update, then member
        return Chunk(losses, e, update, batch, held, member)

    def state(self):
        weights, opt = self.local.state()
        parts = self.gather((weights, opt))
        stacked = {n: np.concatenate([p[0][n] for p in parts]) for n in weights}
        return stacked, {n: np.concatenate([p[1][n] for p in parts]) if np.ndim(a) else a
                         for n, a in opt.items()}

    def wait(self) -> None:
        self.local.wait()

    def finish(self) -> Final:
        f = self.local.finish()
        parts = self.gather(f)
        cat = lambda get: np.concatenate([get(p) for p in parts])  # noqa: E731
        held = None
        if f.held_out is not None:
            held = Prediction(cat(lambda p: p.held_out.mu), cat(lambda p: p.held_out.var),
                              cat(lambda p: p.held_out.loss))
        weights = {n: cat(lambda p, n=n: p.weights[n]) for n in f.weights}
        return Final(weights, cat(lambda p: p.mu), cat(lambda p: p.var),
                     cat(lambda p: p.loss), held)
