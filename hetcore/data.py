"""Data sets: the lecture's own draw, synthetic draws of the same law, the lecture's
contradictory data, and the user's files.

The lecture's law (docs/interface.md): x = linspace(-3, 3, N); y = sin(x) + noise with
standard deviation 0.1 * (3 - |x|), largest at the centre.

The two-sines law (`--preset two-sines`, the lecture's "contradictory data"): x =
linspace(-3, 3, N); each point lies on one of two sine curves, sin(x) or -sin(x), which
one drawn by a fair coin, np.random.default_rng(seed).integers(0, 2, N), and no noise. Its
mean is 0, between the curves where (but at x = 0) no point lies, and its standard
deviation is |sin(x)|: what an NLL fit should find, and an MSE fit cannot say.

Held-out data (`held_out`): a run on synthetic data (the lecture's draw, a `--seed` draw or
two-sines) is also evaluated on a fresh draw of its law at the same N, from the generator
`np.random.default_rng(np.random.SeedSequence(S).spawn(1)[0])`, S the data seed (the
`--seed` given, else 0): the first child of the seed's sequence, a stream independent of
every draw `default_rng(S')` makes, the training data's and the batch orders' included.
`--test-data PATH` gives held-out data instead, in the --data formats.
"""

from __future__ import annotations

import csv
import os
import zipfile
from dataclasses import dataclass

import numpy as np

from hetcore import interchange
from hetcore.errors import UsageError
from hetcore.settings import Settings

X_MIN, X_MAX = -3.0, 3.0
NOISE_SCALE = 0.1
MAX_DATA_BYTES = 4 << 30  # far beyond what one device trains on in full batch


def true_mean(x: np.ndarray) -> np.ndarray:
    return np.sin(x)


def true_sigma(x: np.ndarray) -> np.ndarray:
    return NOISE_SCALE * (3.0 - np.abs(x))




@dataclass(frozen=True)
class Dataset:
    """Training points as 1-D arrays, and where they came from.

    `synthetic` is true when the data follow a known law, so that the true mean and noise
    level are known (the lecture's data included); `law` says which: "sine" (the lecture's)
    or "two-sines".
    """

    x: np.ndarray  # (N,)
    y: np.ndarray  # (N,)
    source: str
    synthetic: bool
    law: str = "sine"

    def columns(self, dtype: str) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) as (N, 1) arrays of `dtype`, the shape both models take."""
        x = np.ascontiguousarray(self.x, dtype=dtype).reshape(-1, 1)
        y = np.ascontiguousarray(self.y, dtype=dtype).reshape(-1, 1)
        return x, y

    def true_mean(self) -> np.ndarray | None:
        return self.true_mean_at(self.x)

    def true_mean_at(self, x: np.ndarray) -> np.ndarray | None:
        """The law's mean at any x, inside the data's range or beyond it (None for data
        that are not synthetic)."""
        if not self.synthetic:
            return None
        x = np.asarray(x, np.float64)
        return np.zeros_like(x) if self.law == "two-sines" else true_mean(x)

    def true_sigma(self) -> np.ndarray | None:
        if not self.synthetic:
            return None
        x = self.x.astype(np.float64)
        return np.abs(np.sin(x)) if self.law == "two-sines" else true_sigma(x)


def held_out_generator(seed: int) -> np.random.Generator:
    """The generator of the held-out draw for data seed `seed` (module docstring)."""
    return np.random.default_rng(np.random.SeedSequence(seed).spawn(1)[0])


def synthetic(n_points: int, seed: int, held_out: bool = False) -> Dataset:
    """A fresh draw of the lecture's law with numpy's PCG64 generator, in float64 (held_out:
    the held-out draw of the same seed)."""
    rng = held_out_generator(seed) if held_out else np.random.default_rng(seed)
    x = np.linspace(X_MIN, X_MAX, n_points)
    y = true_mean(x) + rng.standard_normal(n_points) * true_sigma(x)
    kind = "held-out" if held_out else "synthetic"
    return Dataset(x=x, y=y, source=f"{kind}(n_points={n_points}, seed={seed})", synthetic=True)


def two_sines(n_points: int, seed: int, held_out: bool = False) -> Dataset:
    """The two-sines law (see the module docstring), in float64."""
    rng = held_out_generator(seed) if held_out else np.random.default_rng(seed)
    x = np.linspace(X_MIN, X_MAX, n_points)
    curve = rng.integers(0, 2, n_points)
    y = np.sin(x) * (2 * curve - 1)  # sin(x) on curve 1, -sin(x) on curve 0
    kind = "held-out two-sines" if held_out else "two-sines"
    return Dataset(x=x, y=y, source=f"{kind}(n_points={n_points}, seed={seed})",
                   synthetic=True, law="two-sines")


def lecture() -> Dataset:
    """The lecture's exact data (float32), shipped in the preset file."""
    tensors = interchange.read_preset()
    return Dataset(x=tensors["x"], y=tensors["y"], source="lecture", synthetic=True)


def for_settings(settings: Settings) -> Dataset:
    """The data a run uses: the user's file, the lecture's draw, or a synthetic draw."""
    if settings.data is not None:
        return read(settings.data, settings.dtype)
    if settings.lecture_data:
        return lecture()
    if settings.preset == "two-sines":
        return two_sines(settings.n_points, settings.data_seed)
    return synthetic(settings.n_points, settings.data_seed)


def held_out(settings: Settings, training: Dataset) -> Dataset | None:
    """A run's held-out data: the --test-data file, else, for synthetic training data, a
    fresh draw of their law at the same size (module docstring); None for the user's data
    without a --test-data file."""
    if settings.test_data is not None:
        return read(settings.test_data, settings.dtype, label="--test-data")
    if not training.synthetic:
        return None
    n = training.x.size
    if training.law == "two-sines":
        return two_sines(n, settings.data_seed, held_out=True)
    return synthetic(n, settings.data_seed, held_out=True)


def _as_column(name: str, label: str, a: np.ndarray) -> np.ndarray:
    if a.dtype.kind not in "fiu" or a.dtype.kind == "b":
        raise UsageError(f"{label}: array '{name}' has dtype {a.dtype}, expected real numbers")
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 1:
        raise UsageError(
            f"{label}: array '{name}' has shape {a.shape}, expected (N,) or (N, 1)"
        )
    return a


def _read_npz(path: str, label: str) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04" and magic != b"PK\x05\x06":  # a zip archive, maybe empty
        raise UsageError(f"{label} {path}: not a .npz file (no zip archive inside)")
    try:
        with np.load(path, allow_pickle=False) as f:
            names = sorted(f.files)
            missing = [n for n in ("x", "y") if n not in names]
            if missing:
                raise UsageError(
                    f"{label} {path}: missing array {missing[0]!r} (found {names or 'none'})"
                )
            extra = [n for n in names if n not in ("x", "y")]
            if extra:
                raise UsageError(
                    f"{label} {path}: unexpected arrays {extra}; expected exactly 'x' and 'y'"
                )
            return f["x"], f["y"]
    except UsageError:
        raise
    except ValueError as e:  # object arrays need pickle, which we refuse
        if "pickle" in str(e).lower():
            raise UsageError(f"{label} {path}: holds pickled objects, which are refused") from None
        raise UsageError(f"{label} {path}: not a readable .npz file ({e})") from None
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise UsageError(f"{label} {path}: not a readable .npz file ({e})") from None


def _number(text: str) -> float:
    """A CSV field as a number: Python's float() but for its digit separators ("1_000" is
    Python's literal syntax, not a number a CSV file holds)."""
    if "_" in text:
        raise ValueError(text)
    return float(text)


def _read_csv(path: str, label: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a BOM is fine
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UsageError(f"{label} {path}: cannot read as UTF-8 CSV ({e})") from None
    if not rows:
        raise UsageError(f"{label} {path}: empty file, expected a header 'x,y'")
    header = [h.strip() for h in rows[0]]
    if header != ["x", "y"]:
        raise UsageError(f"{label} {path}: header is {','.join(header)!r}, expected 'x,y'")
    xs, ys = [], []
    for line, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue  # a blank line, e.g. a trailing newline
        if len(row) != 2:
            raise UsageError(f"{label} {path}: line {line} has {len(row)} fields, expected 2")
        try:
            xs.append(_number(row[0]))
            ys.append(_number(row[1]))
        except ValueError:
            raise UsageError(f"{label} {path}: line {line} is not two numbers: {row!r}") from None
    return np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)


def read(path: str, dtype: str = "float64", label: str = "--data") -> Dataset:
    """Read the user's data: `.npz` with arrays x and y, or `.csv` with header x,y.

    Raises UsageError with one line naming the option (`label`), the file and the problem.
    """
    if not os.path.exists(path):
        raise UsageError(f"{label} {path}: no such file")
    if not os.path.isfile(path):
        raise UsageError(f"{label} {path}: not a regular file")
    size = os.path.getsize(path)
    if size > MAX_DATA_BYTES:
        raise UsageError(f"{label} {path}: {size} bytes is more than the {MAX_DATA_BYTES} "
                         "this reader takes")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npz":
        x, y = _read_npz(path, label)
    elif ext == ".csv":
        x, y = _read_csv(path, label)
    else:
        raise UsageError(f"{label} {path}: unknown file type {ext or '(none)'!r}; use .npz or .csv")
    x = _as_column("x", f"{label} {path}", np.asarray(x))
    y = _as_column("y", f"{label} {path}", np.asarray(y))
    if x.shape[0] != y.shape[0]:
        raise UsageError(f"{label} {path}: x has {x.shape[0]} points but y has {y.shape[0]}")
    if x.shape[0] == 0:
        raise UsageError(f"{label} {path}: no data points")
    for name, a in (("x", x), ("y", y)):
        # Finite in the run's precision: 1e300 is finite in float64 but not in float32.
        with np.errstate(over="ignore", invalid="ignore"):
            bad = ~np.isfinite(a.astype(np.float64)) | ~np.isfinite(a.astype(dtype))
        if bad.any():
            i = int(np.argmax(bad))
            raise UsageError(
                f"{label} {path}: {name}[{i}] = {float(a[i])!r} is not a finite {dtype} number"
            )
    return Dataset(
        x=x.astype(np.float64), y=y.astype(np.float64), source=os.path.abspath(path),
        synthetic=False,
    )
