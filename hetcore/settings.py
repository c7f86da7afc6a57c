"""One frozen settings dataclass, shared by both frameworks and the command line."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from hetcore.errors import UsageError

BACKENDS = ("jax", "torch")  # the framework packages, jaxhet and torchhet
FRAMEWORKS = BACKENDS + ("both",)
DEVICES = ("auto", "cpu", "gpu", "tpu")
PRESETS = ("lecture", "none")
DTYPES = ("float32", "float64")
# Training loops per framework (jaxhet.engine, torchhet.engine); "auto" picks the device's
# fastest. Named here so that settings are checked before either framework is imported.
LOOPS = {"jax": ("scan", "step"),
         "torch": ("eager", "optim", "compile", "cudagraph", "reduce-overhead",
                   "no-autograd")}
# Loops without rematerialisation: torchhet's no-autograd writes its backward out and keeps
# depth + 1 (N, width) blocks (torchhet/handgrad.py); --remat with it is refused here.
NO_REMAT = ("no-autograd",)

# The lecture's run.
LECTURE = dict(epochs=500, lr=1e-3, n_points=500, width=512, depth=2, dtype="float32")
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
      chunk_epochs: epochs per compiled chunk; the progress bar moves once per chunk.
      loop: the training loop (LOOPS), "auto" for the device's fastest.
      checkpoint_every: write a checkpoint every this many epochs (0: never).
      remat: rematerialise the trunk in the backward pass (about sqrt(depth) segments whose
        activations are recomputed instead of kept): less memory, one more trunk forward,
        the same run.
    """

    framework: str = "jax"
    device: str = "auto"
    preset: str = "lecture"
    epochs: int = LECTURE["epochs"]
    lr: float = LECTURE["lr"]
    seed: int | None = None
    n_points: int = LECTURE["n_points"]
    width: int = LECTURE["width"]
    depth: int = LECTURE["depth"]
    dtype: str = LECTURE["dtype"]
    full: bool = False
    data: str | None = None
    init_from: str | None = None
    chunk_epochs: int = 100
    loop: str = "auto"
    checkpoint_every: int = 0
    remat: bool = False

    def __post_init__(self):
        validate(self)

    def replace(self, **changes) -> "Settings":
        return dataclasses.replace(self, **changes)

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
        )

    @property
    def data_seed(self) -> int:
        return DEFAULT_SEED if self.seed is None else self.seed

    @property
    def init_seed(self) -> int:
        return DEFAULT_SEED if self.seed is None else self.seed

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def memory_estimate(width: int, depth: int, n_points: int, dtype: str) -> int:
    """Bytes a full-batch training step needs, roughly: weights, gradients and updated
    weights (x4 for slack) and the activations backpropagation keeps (z and relu(z) per
    layer, and as much again for their gradients)."""
    itemsize = 8 if dtype == "float64" else 4
    params = 2 * width + (depth - 1) * (width * width + width) + 2 * (width + 1)
    activations = 4 * n_points * width * depth + 16 * n_points
    return itemsize * (4 * params + activations)


def check_memory(settings: "Settings", n_points: int, capacity: int, device: str) -> None:
    """Refuse, before any work, a run that cannot fit in `capacity` bytes of `device`."""
    need = memory_estimate(settings.width, settings.depth, n_points, settings.dtype)
    if need > capacity:
        raise UsageError(
            f"--width {settings.width} --depth {settings.depth} on {n_points} points: needs "
            f"about {need / 2**30:.1f} GiB, more than the {capacity / 2**30:.1f} GiB of {device}"
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
    _check_int("--n-points", s.n_points, 1)
    _check_int("--width", s.width, 1)
    _check_int("--depth", s.depth, 1)
    _check_int("--chunk-epochs", s.chunk_epochs, 1)
    _check_int("--checkpoint-every", s.checkpoint_every, 0)
    if s.seed is not None:
        _check_int("--seed", s.seed, 0)
        if s.seed >= 2**32:
            raise UsageError(f"--seed: must be below 2**32, got {s.seed}")
    if isinstance(s.lr, bool) or not isinstance(s.lr, (int, float)):
        raise UsageError(f"--lr: expected a number, got {s.lr!r}")
    if not math.isfinite(s.lr) or s.lr <= 0:
        raise UsageError(f"--lr: must be finite and positive, got {s.lr}")
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
    if s.remat and s.loop in NO_REMAT:
        others = [loop for loop in LOOPS["torch"] if loop not in NO_REMAT]
        raise UsageError(f"--remat: --loop {s.loop} does not rematerialise (it keeps depth + 1 "
                         f"activation blocks); use {', '.join(others)}")
