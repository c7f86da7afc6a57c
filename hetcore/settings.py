"""One frozen settings dataclass, shared by both frameworks and the command line."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from hetcore.errors import UsageError

BACKENDS = ("jax", "torch")  # the framework packages, jaxhet and torchhet
FRAMEWORKS = BACKENDS + ("both",)
DEVICES = ("auto", "cpu", "gpu", "tpu")
PRESETS = ("lecture", "none", "two-sines")
DTYPES = ("float32", "float64")
LOSSES = ("nll", "beta-nll", "mse")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine")
# Training loops per framework (jaxhet.engine, torchhet.engine); "auto" picks the device's
# fastest. Named here so that settings are checked before either framework is imported.
LOOPS = {"jax": ("scan", "step"),
         "torch": ("eager", "optim", "compile", "cudagraph", "reduce-overhead",
                   "no-autograd", "compile-update")}
# Loops without rematerialisation: torchhet's no-autograd writes its backward out and keeps
# depth + 1 (N, width) blocks (torchhet/handgrad.py), compile-update traces whole updates
# (torchhet/whole.py); --remat with them is refused here.
NO_REMAT = ("no-autograd", "compile-update")

# The lecture's run.
LECTURE = dict(epochs=500, lr=1e-3, n_points=500, width=512, depth=2, dtype="float32")
MAX_EPOCHS = 10**7  # a loss history of 80 MB; more is refused before any work
MAX_ENSEMBLE = 4096  # members trained together; each is a whole model in memory
MAX_DEVICES = 4096  # data-parallel devices (or processes); more than any machine has
# Trunk layers: each is its own operation in every compiled program (tracing and compiling
# grow with depth, not with memory, so the memory check cannot catch a depth of 10**5)
MAX_DEPTH = 100
DEVICE_LOOPS = {"jax": ("scan",), "torch": ("eager", "optim")}  # the loops that shard
# The loops an ensemble's program has: its own (auto), JAX's scan, torch's compiled one
ENSEMBLE_LOOPS = {"jax": ("auto", "scan"), "torch": ("auto", "compile-update"),
                  "both": ("auto",)}

# Recipes: named defaults for the training options (the fields of RECIPE_FIELDS); an option
# given explicitly overrides the recipe's, and a recipe's default for an option that does
# not apply to what is given (its --beta once --loss nll is given, say) is dropped.
# `calibrated` is the recommended recipe for recovering sigma(x); docs/recipes.md shows the
# sweep that chose it and what each ingredient buys.
RECIPES = {
    "lecture": dict(epochs=LECTURE["epochs"], lr=LECTURE["lr"], loss="nll", optimizer="sgd",
                    momentum=0.0, nesterov=False, schedule="constant", warmup_steps=0),
    "calibrated": dict(epochs=1000, lr=1e-3, loss="nll", optimizer="adamw", weight_decay=2.0,
                       schedule="cosine", warmup_steps=0, lr_end=0.0),
}
# What each option defaults to where it applies and the recipe does not say.
OPTION_DEFAULTS = dict(beta=0.5, momentum=0.0, nesterov=False, weight_decay=1e-4,
                       schedule="constant", warmup_steps=0, lr_end=0.0)
RECIPE_FIELDS = ("epochs", "lr", "loss", "beta", "optimizer", "momentum", "nesterov",
                 "weight_decay", "schedule", "warmup_steps", "lr_end", "batch_size")
LECTURE_SEED = 10  # torch.random.manual_seed(10) in the lecture
EPS = 1e-6  # added to softplus(var_head) in both frameworks
DEFAULT_SEED = 0  # seed of synthetic data and initial weights when none is given


@dataclass(frozen=True)
class Settings:
    """Everything that determines a run, apart from the data and initial weights themselves.

    Attributes:
      preset: "lecture" takes the lecture's exact data and initial weights where the settings
        leave them as in the lecture; "none" always draws synthetic data and weights from
        `seed`.
      seed: None means "the preset's own" (the lecture's data and weights; for "none", 0).
      test_data: held-out data (a --data file); None: for synthetic data, a fresh draw of
        their law (hetcore.data.held_out), else none. They never change the training.
      chunk_epochs: epochs per compiled chunk; the progress bar moves once per chunk, and
        the held-out loss is taken at each chunk's end.
      loop: the training loop (LOOPS), "auto" for the device's fastest.
      checkpoint_every: write a checkpoint every this many epochs (0: never).
      remat: rematerialise the trunk in the backward pass (about sqrt(depth) segments whose
        activations are recomputed instead of kept): less memory, one more trunk forward,
        the same run.
      recipe: named defaults (RECIPES) for the fields of RECIPE_FIELDS left None; once
        built, every field holds its value, and a field that does not apply holds None
        (beta without beta-nll, momentum without sgd, weight_decay without adamw, lr_end
        without cosine; batch_size None: every point in one batch).
      loss: nll (the lecture's), beta-nll (each point's NLL weighted by var**beta, the
        weight not differentiated) or mse (the mean only; sigma is then the training
        residuals' root mean square, at every x).
      optimizer, momentum, nesterov, weight_decay: sgd (PyTorch's law: dampening 0, the
        buffer starts as the first gradient), adam or adamw (betas 0.9, 0.999, eps 1e-8;
        adamw decays every parameter by weight_decay).
      schedule, warmup_steps, lr_end: the learning rate of update t (counted over the whole
        run, one per batch): lr * t / warmup_steps while t < warmup_steps, then lr
        (constant) or lr_end + (lr - lr_end) * (1 + cos(pi * (t - W) / (T - W))) / 2
        (cosine), T the run's number of updates.
      ensemble: K members trained together in one program; member k starts from the
        initial weights drawn with seed init_seed + k (or the k-th of a stacked --init-from
        file) and visits its batches with shuffle seed shuffle_seed + k. Its predictions
        are the members' Gaussian mixture.
      devices: data-parallel training over this many devices (JAX: a one-axis mesh, each
        batch's points split over it; torch: as many processes, DistributedDataParallel),
        with the one-device run's result up to the order of the sums: each batch's loss
        and gradient are the mean over all its points, however unevenly they split. An
        ensemble's members are spread over the devices instead (ensemble / devices on
        each, every member's data whole), which is what lets more members train than one
        device holds.
      batch_size, shuffle_seed: epoch e visits the points in the order
        np.random.default_rng([shuffle_seed, e]).permutation(N), in batches of batch_size
        (the last one shorter), one update each; batch_size >= N is the full batch, with
        nothing permuted.
    """

    framework: str = "jax"
    device: str = "auto"
    preset: str = "lecture"
    epochs: int | None = None
    lr: float | None = None
    seed: int | None = None
    n_points: int = LECTURE["n_points"]
    width: int = LECTURE["width"]
    depth: int = LECTURE["depth"]
    dtype: str = LECTURE["dtype"]
    full: bool = False
    data: str | None = None
    test_data: str | None = None
    init_from: str | None = None
    chunk_epochs: int = 100
    loop: str = "auto"
    checkpoint_every: int = 0
    remat: bool = False
    recipe: str = "lecture"
    loss: str | None = None
    beta: float | None = None
    optimizer: str | None = None
    momentum: float | None = None
    nesterov: bool | None = None
    weight_decay: float | None = None
    schedule: str | None = None
    warmup_steps: int | None = None
    lr_end: float | None = None
    batch_size: int | None = None
    shuffle_seed: int = 0
    ensemble: int = 1
    devices: int = 1

    def __post_init__(self):
        _check_choice("--recipe", self.recipe, tuple(RECIPES))
        for name, value in resolve_recipe(self).items():
            object.__setattr__(self, name, value)  # frozen: set once, while being built
        validate(self)

    def replace(self, **changes) -> "Settings":
        """These settings with `changes`; a training option that no longer applies to the
        changed loss, optimizer or schedule is dropped unless `changes` gives it."""
        new = {**self.to_dict(), **changes}
        for name, (applies, _) in _APPLIES.items():
            if name not in changes and not applies(new):
                new[name] = None
        return Settings(**new)

    @property
    def lecture_data(self) -> bool:
        """Whether the data are the lecture's own (shipped) draw."""
        return (
            self.data is None
            and self.preset == "lecture"
            and self.seed is None
            and self.n_points == LECTURE["n_points"]
        )

    @property
    def lecture_weights(self) -> bool:
        """Whether the initial weights are the lecture's own (shipped) draw."""
        return (
            self.init_from is None
            and self.preset == "lecture"
            and self.seed is None
            and self.width == LECTURE["width"]
            and self.depth == LECTURE["depth"]
            and self.ensemble == 1
        )

    @property
    def data_seed(self) -> int:
        return DEFAULT_SEED if self.seed is None else self.seed

    @property
    def init_seed(self) -> int:
        return DEFAULT_SEED if self.seed is None else self.seed

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def batches(self, n_points: int) -> int:
        """Batches (and updates) per epoch on n_points."""
        return 1 if self.batch_size is None else -(-n_points // min(self.batch_size, n_points))

    def full_batch(self, n_points: int) -> bool:
        """Whether an epoch is one batch of every point, in input order (the lecture's)."""
        return self.batch_size is None or self.batch_size >= n_points

    @property
    def plain_sgd(self) -> bool:
        """The lecture's update: param -= lr * grad, the same lr at every update."""
        return (self.optimizer == "sgd" and not self.momentum and self.schedule == "constant"
                and self.warmup_steps == 0)

    def check_run(self, n_points: int) -> None:
        """What can only be checked once the data's size is known: the warm-up must end
        before the run does."""
        total = self.epochs * self.batches(n_points)
        if self.warmup_steps and self.warmup_steps >= total:
            raise UsageError(f"--warmup-steps {self.warmup_steps}: longer than the run's "
                             f"{total} updates ({self.epochs} epochs x "
                             f"{self.batches(n_points)} batches)")
        if total >= 2**31:
            raise UsageError(f"--epochs {self.epochs}: {total} updates, more than 2**31 - 1")


# Which training options apply, given the loss, optimizer and schedule (and how to say why
# not): an option given where it does not apply is refused.
_APPLIES = {
    "beta": (lambda r: r["loss"] == "beta-nll", "only --loss beta-nll takes --beta"),
    "momentum": (lambda r: r["optimizer"] == "sgd", "only --optimizer sgd takes --momentum"),
    "nesterov": (lambda r: r["optimizer"] == "sgd", "only --optimizer sgd takes --nesterov"),
    "weight_decay": (lambda r: r["optimizer"] == "adamw",
                     "only --optimizer adamw takes --weight-decay (adam's would be an L2 "
                     "penalty, sgd's has none here)"),
    "lr_end": (lambda r: r["schedule"] == "cosine", "only --schedule cosine takes --lr-end"),
}


def resolve_recipe(s: "Settings") -> dict:
    """Every field of RECIPE_FIELDS resolved: given (not None), else the recipe's, else the
    option's default where it applies, else None. Raises UsageError for a given option that
    does not apply."""
    recipe = RECIPES[s.recipe]
    given = {f: getattr(s, f) for f in RECIPE_FIELDS if getattr(s, f) is not None}
    out = {f: given.get(f, recipe.get(f)) for f in ("epochs", "lr", "loss", "optimizer",
                                                     "schedule", "batch_size")}
    out["schedule"] = out["schedule"] or OPTION_DEFAULTS["schedule"]
    for name in ("loss", "optimizer", "schedule"):
        _check_choice(f"--{name}", out[name], {"loss": LOSSES, "optimizer": OPTIMIZERS,
                                                "schedule": SCHEDULES}[name])
    for name, (applies, why) in _APPLIES.items():
        if not applies(out):
            if name in given:
                raise UsageError(f"--{name.replace('_', '-')} {given[name]}: {why}")
            out[name] = None
        else:
            out[name] = given.get(name, recipe.get(name, OPTION_DEFAULTS[name]))
    out["warmup_steps"] = given.get("warmup_steps", recipe.get("warmup_steps",
                                                               OPTION_DEFAULTS["warmup_steps"]))
    return out

def memory_estimate(width: int, depth: int, n_points: int, dtype: str) -> int:
    """Bytes a full-batch training step needs, roughly: weights, gradients and updated
    weights (x4 for slack) and the activations backpropagation keeps (z and relu(z) per
    layer, and as much again for their gradients)."""
    itemsize = 8 if dtype == "float64" else 4
    params = 2 * width + (depth - 1) * (width * width + width) + 2 * (width + 1)
    activations = 4 * n_points * width * depth + 16 * n_points
    return itemsize * (4 * params + activations)


def predict_memory_estimate(width: int, depth: int, n_points: int, dtype: str) -> int:
    """Bytes a forward pass on n_points needs, roughly: the weights, two (N, width) blocks
    alive at a time, and the inputs and outputs."""
    itemsize = 8 if dtype == "float64" else 4
    params = 2 * width + (depth - 1) * (width * width + width) + 2 * (width + 1)
    return itemsize * (params + 2 * n_points * width + 8 * n_points)


def check_predict_memory(width: int, depth: int, dtype: str, n_points: int, capacity: int,
                         device: str, label: str) -> None:
    """Refuse, before any work, predictions on `label`'s n_points that cannot fit."""
    need = predict_memory_estimate(width, depth, n_points, dtype)
    if need > capacity:
        raise UsageError(f"{label}: {n_points} points need about {need / 2**30:.1f} GiB to "
                         f"predict at width {width}, more than the {capacity / 2**30:.1f} GiB "
                         f"of {device}")


def check_memory(settings: "Settings", n_points: int, capacity: int, device: str) -> None:
    """Refuse, before any work, a run that cannot fit in `capacity` bytes of `device` (an
    ensemble's members are each a whole run's memory; spread over --devices, each device
    holds its share of them)."""
    per_device = -(-settings.ensemble // settings.devices)
    need = per_device * memory_estimate(settings.width, settings.depth, n_points,
                                        settings.dtype)
    if need > capacity:
        members = f" x {per_device} members" if settings.ensemble > 1 else ""
        if settings.ensemble > 1 and settings.devices > 1:
            members += " a device"
        raise UsageError(
            f"--width {settings.width} --depth {settings.depth} on {n_points} points"
            f"{members}: needs about {need / 2**30:.1f} GiB, more than the "
            f"{capacity / 2**30:.1f} GiB of {device}"
        )


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{name}: expected an integer, got {value!r}")
    if value < minimum:
        raise UsageError(f"{name}: must be at least {minimum}, got {value}")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise UsageError(f"{name}: must be one of {', '.join(choices)}, got {value!r}")


def validate(s: Settings) -> None:
    """Raise UsageError naming the first setting that is out of range."""
    _check_choice("--framework", s.framework, FRAMEWORKS)
    _check_choice("--device", s.device, DEVICES)
    _check_choice("--preset", s.preset, PRESETS)
    _check_choice("--dtype", s.dtype, DTYPES)
    _check_int("--epochs", s.epochs, 1)
    if s.epochs > MAX_EPOCHS:
        raise UsageError(f"--epochs: at most {MAX_EPOCHS}, got {s.epochs}")
    _check_int("--n-points", s.n_points, 1)
    _check_int("--width", s.width, 1)
    _check_int("--depth", s.depth, 1)
    if s.depth > MAX_DEPTH:
        raise UsageError(f"--depth: at most {MAX_DEPTH} layers, got {s.depth}")
    _check_int("--chunk-epochs", s.chunk_epochs, 1)
    _check_int("--checkpoint-every", s.checkpoint_every, 0)
    _check_int("--ensemble", s.ensemble, 1)
    if s.ensemble > MAX_ENSEMBLE:
        raise UsageError(f"--ensemble: at most {MAX_ENSEMBLE} members, got {s.ensemble}")
    if s.ensemble > 1 and s.loop not in ENSEMBLE_LOOPS[s.framework]:
        raise UsageError(f"--ensemble: members train in one vmapped program (jax scan, torch "
                         f"torch.func, or compiled: compile-update); --loop {s.loop} trains "
                         "one model")
    if s.ensemble > 1 and s.remat:
        raise UsageError("--ensemble: --remat is for one model's activations; drop it")
    _check_devices(s)
    if s.seed is not None:
        _check_int("--seed", s.seed, 0)
        if s.seed + s.ensemble - 1 >= 2**32:
            raise UsageError(f"--seed: must be below 2**32 (less the ensemble's members), got "
                             f"{s.seed}")
    if isinstance(s.lr, bool) or not isinstance(s.lr, (int, float)):
        raise UsageError(f"--lr: expected a number, got {s.lr!r}")
    if not math.isfinite(s.lr) or s.lr <= 0:
        raise UsageError(f"--lr: must be finite and positive, got {s.lr}")
    with np.errstate(over="ignore", under="ignore"):
        cast = float(np.asarray(s.lr, s.dtype))
    if not 0 < cast < math.inf:  # overflows to inf or underflows to 0 in the run
        raise UsageError(f"--lr: {s.lr} is {cast} in {s.dtype}, the run's dtype")
    if s.loop != "auto":
        for fw in ("jax", "torch") if s.framework == "both" else (s.framework,):
            if s.loop not in LOOPS[fw]:
                raise UsageError(
                    f"--loop {s.loop}: not a {fw} loop; {fw} has auto, {', '.join(LOOPS[fw])}"
                )
    if not isinstance(s.full, bool):
        raise UsageError(f"--full: expected a boolean, got {s.full!r}")
    if not isinstance(s.remat, bool):
        raise UsageError(f"--remat: expected a boolean, got {s.remat!r}")
    _validate_training(s)
    if s.remat and s.loop in NO_REMAT:
        others = [loop for loop in LOOPS["torch"] if loop not in NO_REMAT]
        raise UsageError(f"--remat: --loop {s.loop} does not rematerialise (it keeps depth + 1 "
                         f"activation blocks); use {', '.join(others)}")


def _check_devices(s: Settings) -> None:
    """--devices: a count, and only with what shards (whether that many are present is the
    backend's to say, hetcore.backend.Backend.mesh)."""
    _check_int("--devices", s.devices, 1)
    if s.devices > MAX_DEVICES:
        raise UsageError(f"--devices: at most {MAX_DEVICES}, got {s.devices}")
    if s.devices == 1:
        return
    if s.framework == "both":
        raise UsageError(f"--devices {s.devices}: torch runs one process a device, jax one "
                         "process for all; train each --framework on its own")
    if s.ensemble > 1 and s.ensemble % s.devices:
        raise UsageError(f"--devices {s.devices}: an ensemble's members are spread over the "
                         f"devices, the same number on each; --ensemble {s.ensemble} is not a "
                         f"multiple of {s.devices}")
    if s.loop != "auto" and s.loop not in DEVICE_LOOPS[s.framework]:
        raise UsageError(f"--loop {s.loop}: trains on one device; with --devices, "
                         f"{s.framework} runs auto, {', '.join(DEVICE_LOOPS[s.framework])}")


def _check_number(name: str, value, low: float, high: float, high_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"{name}: expected a number, got {value!r}")
    if not math.isfinite(value) or value < low or value > high or (high_open and value == high):
        raise UsageError(f"{name}: must be in [{low:g}, {high:g}{')' if high_open else ']'}, "
                         f"got {value}")


def _validate_training(s: Settings) -> None:
    """The training options (see Settings): their ranges, and what goes together."""
    if s.beta is not None:
        _check_number("--beta", s.beta, 0.0, 1.0)
    if s.momentum is not None:
        _check_number("--momentum", s.momentum, 0.0, 1.0, high_open=True)
    if s.nesterov is not None and not isinstance(s.nesterov, bool):
        raise UsageError(f"--nesterov: expected a boolean, got {s.nesterov!r}")
    if s.nesterov and not s.momentum:
        raise UsageError("--nesterov: needs --momentum above 0 (Nesterov's step is a "
                         "momentum step)")
    if s.weight_decay is not None:
        _check_number("--weight-decay", s.weight_decay, 0.0, 10.0)
    _check_int("--warmup-steps", s.warmup_steps, 0)
    if s.lr_end is not None:
        _check_number("--lr-end", s.lr_end, 0.0, s.lr)
    if s.batch_size is not None:
        _check_int("--batch-size", s.batch_size, 1)
    _check_int("--shuffle-seed", s.shuffle_seed, 0)
    if s.shuffle_seed + s.ensemble - 1 >= 2**63:
        raise UsageError(f"--shuffle-seed: must be below 2**63 (less the ensemble's members), "
                         f"got {s.shuffle_seed}")
    if s.full and s.loss == "mse":
        raise UsageError("--full: adds the NLL's constant; --loss mse has none")
