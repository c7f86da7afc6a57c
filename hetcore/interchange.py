"""The weights interchange file: safetensors, torch names and layout.

In memory a set of weights is a "state dict": a dict from the lecture module's state_dict
names to numpy arrays in torch layout, (out, in) for weights. jaxhet.weights converts it to
and from Flax's layout; torchhet uses it as it is. No pickle is read or written anywhere.
"""

from __future__ import annotations

import json
import math
import os
from importlib import resources

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from hetcore.errors import UsageError
from hetcore.settings import LECTURE

PRESET_FILE = "lecture.safetensors"
METADATA_KEY = "jaxhet"
HEADER_ALLOWANCE = 1 << 20  # bytes of safetensors header and metadata a file may add


def names(depth: int) -> list[str]:
    """Tensor names in module order: the trunk's Linear layers sit at even Sequential indices
    because a ReLU follows each one."""
    out = []
    for k in range(depth):
        out += [f"layers.{2 * k}.weight", f"layers.{2 * k}.bias"]
    return out + ["mean_head.weight", "mean_head.bias", "var_head.weight", "var_head.bias"]


def shapes(width: int, depth: int, in_features: int = 1) -> dict[str, tuple[int, ...]]:
    """Expected torch-layout shape of every tensor."""
    out: dict[str, tuple[int, ...]] = {}
    fan_in = in_features
    for k in range(depth):
        out[f"layers.{2 * k}.weight"] = (width, fan_in)  # (out, in)
        out[f"layers.{2 * k}.bias"] = (width,)
        fan_in = width
    for head in ("mean_head", "var_head"):
        out[f"{head}.weight"] = (1, width)
        out[f"{head}.bias"] = (1,)
    return out


def init_bound(fan_in: int) -> float:
    """The initial law both frameworks draw from, torch.nn.Linear's default: every tensor
    of a layer uniform in (-b, b), b = 1/sqrt(the layer's fan-in) (kaiming_uniform with
    a=sqrt(5) for the weight, the same bound for the bias)."""
    return 1.0 / math.sqrt(fan_in)


def init_bounds(width: int, depth: int, in_features: int = 1) -> dict[str, float]:
    """init_bound of every tensor, by name."""
    expected = shapes(width, depth, in_features)
    return {n: init_bound(expected[n.rsplit(".", 1)[0] + ".weight"][1]) for n in expected}


def draw_initial(width: int, depth: int, dtype: str, seed: int) -> dict[str, np.ndarray]:
    """Initial weights of that law drawn by numpy (PCG64, `seed`), in module order: for
    code that must give both frameworks the same weights without either's generator."""
    rng = np.random.default_rng(seed)
    return {n: rng.uniform(-b, b, s).astype(dtype)
            for (n, s), b in zip(shapes(width, depth).items(), init_bounds(width, depth).values())}


def check(state: dict, width: int, depth: int, dtype: str, label: str = "weights") -> None:
    """Raise UsageError naming the first tensor whose name, shape, dtype or values do not fit."""
    expected = shapes(width, depth)
    missing = [n for n in expected if n not in state]
    if missing:
        raise UsageError(f"{label}: missing tensor '{missing[0]}' (width {width}, depth {depth})")
    extra = sorted(n for n in state if n not in expected)
    if extra:
        raise UsageError(
            f"{label}: unexpected tensor '{extra[0]}' for width {width}, depth {depth}"
        )
    for name, shape in expected.items():
        a = state[name]
        if tuple(a.shape) != shape:
            raise UsageError(
                f"{label}: tensor '{name}' has shape {tuple(a.shape)}, expected {shape} "
                f"(width {width}, depth {depth})"
            )
        if str(a.dtype) != dtype:
            raise UsageError(f"{label}: tensor '{name}' is {a.dtype}, expected {dtype}")
        if not np.isfinite(a).all():
            raise UsageError(f"{label}: tensor '{name}' holds non-finite values")


def write(path: str, state: dict, metadata: dict | None = None) -> None:
    """Write tensors as safetensors: a state dict in module order, anything else sorted by
    name, so that the same tensors always give the same bytes."""
    depth = sum(1 for n in state if n.startswith("layers.") and n.endswith(".weight"))
    order = [n for n in names(depth) if n in state] if depth else []
    order += sorted(n for n in state if n not in order)
    # np.require, not np.ascontiguousarray, which makes a 0-d array (an optimiser's step
    # count) 1-d
    ordered = {n: np.require(state[n], requirements="C") for n in order}
    # One metadata entry: safetensors keeps metadata in a hash map whose order varies from
    # process to process, so several entries would make the same file differ in bytes.
    meta = {METADATA_KEY: json.dumps(metadata, sort_keys=True)} if metadata else None
    save_file(ordered, path, metadata=meta)


def read(path: str, label: str = "--init-from", max_bytes: int | None = None
         ) -> dict[str, np.ndarray]:
    """Read a safetensors file into a dict of numpy arrays; anything else is refused.

    `max_bytes` refuses a file larger than what it should hold before reading it.
    """
    if not os.path.exists(path):
        raise UsageError(f"{label} {path}: no such file")
    if not os.path.isfile(path):
        raise UsageError(f"{label} {path}: not a regular file")
    size = os.path.getsize(path)
    if max_bytes is not None and size > max_bytes:
        raise UsageError(f"{label} {path}: {size} bytes is more than the {max_bytes} that the "
                         "expected tensors take")
    with open(path, "rb") as f:
        head, brace = f.read(8), f.read(1)
    # safetensors opens with its header's length (u64, little-endian) and the header's "{";
    # only what does not is judged by its first bytes (a header of 128 + 256k bytes also
    # opens with 0x80, as a pickle does).
    header_len = int.from_bytes(head, "little") if len(head) == 8 else -1
    looks_safetensors = brace == b"{" and 0 < header_len <= size - 8
    if brace == b"{" and header_len > size - 8:  # a safetensors file cut short
        raise UsageError(f"{label} {path}: not a valid safetensors file (truncated: its "
                         f"header alone says {header_len} bytes, the file has {size})")
    if not looks_safetensors and (head[:2] == b"PK" or head[:1] == b"\x80"):
        raise UsageError(
            f"{label} {path}: looks like a pickle or torch.save file, which is refused; "
            "use safetensors"
        )
    if looks_safetensors:
        _refuse_foreign_dtypes(path, header_len, label)
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"{label} {path}: not a valid safetensors file ({msg})") from None


# safetensors' dtype codes that numpy holds; a file may hold others (bfloat16, float8).
NUMPY_DTYPES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16",
                "I16": "int16", "F16": "float16", "U32": "uint32", "I32": "int32",
                "F32": "float32", "U64": "uint64", "I64": "int64", "F64": "float64"}


def _refuse_foreign_dtypes(path: str, header_len: int, label: str) -> None:
    """A tensor of a dtype numpy cannot hold (bfloat16, say) is refused naming the tensor
    and its dtype, not as a broken file. A header that does not parse is left to the
    reader, which names what is wrong with it."""
    with open(path, "rb") as f:
        f.seek(8)
        raw = f.read(min(header_len, HEADER_ALLOWANCE))
    try:
        header = json.loads(raw)
    except ValueError:
        return
    if not isinstance(header, dict):
        return
    for name, info in sorted(header.items()):
        code = info.get("dtype") if isinstance(info, dict) and name != "__metadata__" else None
        if isinstance(code, str) and code not in NUMPY_DTYPES:
            kind = {"BF16": "bfloat16"}.get(code, code.lower())
            raise UsageError(f"{label} {path}: tensor '{name}' is {kind}; weights are float32 "
                             "or float64")


def read_metadata(path: str, label: str = "--weights") -> dict:
    """The metadata `write` stored (an empty dict if none); metadata that is not a JSON
    object is a UsageError naming the file."""
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as f:
        meta = f.metadata() or {}
    if METADATA_KEY not in meta:
        return {}
    try:
        value = json.loads(meta[METADATA_KEY])
    except (ValueError, RecursionError) as e:  # RecursionError: nested past json's depth
        raise UsageError(f"{label} {path}: metadata '{METADATA_KEY}' is not JSON ({e})") from None
    if not isinstance(value, dict):
        raise UsageError(f"{label} {path}: metadata '{METADATA_KEY}' is not a JSON object")
    return value


def constant_sigma(meta: dict, members: int | None, label: str) -> list[float] | None:
    """An MSE run's sigma from its weights' metadata (CONSTANT_SIGMA): one positive finite
    number for one model, a list of `members` of them for an ensemble; None when absent;
    anything else is a UsageError."""
    value = meta.get(CONSTANT_SIGMA)
    if value is None:
        return None
    values = value if members is not None else [value]
    ok = isinstance(values, list) and len(values) == (members or 1) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
        for v in values)
    if not ok:
        want = f"a list of {members} positive numbers" if members else "a positive number"
        raise UsageError(f"{label}: metadata '{CONSTANT_SIGMA}' is {value!r}, expected {want}")
    return [float(v) for v in values]


def read_weights(path: str, width: int, depth: int, dtype: str, members: int = 1
                 ) -> dict[str, np.ndarray]:
    """Read and check an interchange file against the requested architecture and dtype;
    members > 1: an ensemble's stacked file, a leading member axis of `members`. Its
    metadata is not used, but metadata that is not a JSON object is refused (as evaluate
    refuses it): a file whose metadata is broken is not one to train from."""
    itemsize = np.dtype(dtype).itemsize
    expected = sum(int(np.prod(s)) for s in shapes(width, depth).values()) * itemsize
    state = read(path, max_bytes=members * expected + HEADER_ALLOWANCE)
    read_metadata(path, "--init-from")
    if members == 1:
        check(state, width, depth, dtype, label=f"--init-from {path}")
    else:
        check_stacked(state, members, width, depth, dtype, label=f"--init-from {path}")
    return {n: state[n] for n in names(depth)}  # module order


def read_preset() -> dict[str, np.ndarray]:
    """The lecture preset: data `x`, `y` (float32) and the lecture's initial weights."""
    ref = resources.files("hetcore") / "presets" / PRESET_FILE
    with resources.as_file(ref) as p:
        return load_file(str(p))


def lecture_weights() -> dict[str, np.ndarray]:
    """The lecture's initial weights (float32, torch layout)."""
    tensors = read_preset()
    return {n: tensors[n] for n in names(LECTURE["depth"])}


def cast(state: dict, dtype: str) -> dict[str, np.ndarray]:
    return {n: np.asarray(a, dtype=dtype) for n, a in state.items()}


def architecture(state: dict) -> tuple[int, int]:
    """(width, depth) of a state dict, read from its tensor shapes."""
    depth = sum(1 for n in state if n.startswith("layers.") and n.endswith(".weight"))
    if depth == 0 or "layers.0.weight" not in state:
        raise UsageError("weights: missing tensor 'layers.0.weight'")
    return int(np.shape(state["layers.0.weight"])[0]), depth


# Metadata of an MSE run's weights: the sigma it reports at every x (the training
# residuals' RMS), since its variance head was never trained; evaluating them uses it.
CONSTANT_SIGMA = "constant_sigma"

# The largest weights file `read_model` takes: far beyond any model one device evaluates.
MAX_WEIGHTS_BYTES = 16 << 30


def stack(states: list[dict]) -> dict[str, np.ndarray]:
    """An ensemble's interchange state: each tensor of the members' state dicts stacked on a
    leading member axis (as torch.func.stack_module_state gives them), in module order."""
    return {n: np.stack([st[n] for st in states]) for n in states[0]}


def unstack(state: dict) -> list[dict[str, np.ndarray]]:
    """The members' state dicts of a stacked state (the inverse of `stack`)."""
    k = next(iter(state.values())).shape[0]
    return [{n: np.ascontiguousarray(a[i]) for n, a in state.items()} for i in range(k)]


def check_stacked(state: dict, members: int, width: int, depth: int, dtype: str,
                  label: str = "weights") -> None:
    """Raise UsageError naming the first tensor of a stacked state that has no leading
    member axis of `members`, or whose member slices do not fit (`check`)."""
    for name in names(depth):
        a = state.get(name)
        if a is not None and (a.ndim == 0 or a.shape[0] != members):
            raise UsageError(f"{label}: tensor '{name}' has shape {tuple(a.shape)}, expected "
                             f"a leading member axis of {members}")
    check({n: a[0] if a.ndim else a for n, a in state.items()}, width, depth, dtype, label)
    for name in names(depth):
        if not np.isfinite(state[name]).all():
            raise UsageError(f"{label}: tensor '{name}' holds non-finite values")


def read_model(path: str, label: str = "--weights"
               ) -> tuple[dict[str, np.ndarray], int, int, str, int | None]:
    """An interchange file of any width, depth and dtype, of one model or of an ensemble:
    (state dict in module order, width, depth, dtype, members), members None for one model
    and K for an ensemble's stacked file (a leading member axis of K on every tensor). The
    architecture is read from the shapes and checked whole; any defect is a UsageError
    naming the file and the first tensor that does not fit."""
    state = read(path, label=label, max_bytes=MAX_WEIGHTS_BYTES)
    where = f"{label} {path}"
    first = state.get("layers.0.weight")
    if first is None:
        raise UsageError(f"{where}: missing tensor 'layers.0.weight'")
    members = int(first.shape[0]) if first.ndim == 3 else None
    single = first[0] if members else first
    if single.ndim != 2 or single.shape[0] < 1 or (members is not None and members < 1):
        raise UsageError(f"{where}: tensor 'layers.0.weight' has shape {tuple(first.shape)}, "
                         "expected (width, 1), or (members, width, 1) for an ensemble")
    dtype = str(first.dtype)
    if dtype not in ("float32", "float64"):
        raise UsageError(f"{where}: tensor 'layers.0.weight' is {dtype}, expected float32 or "
                         "float64")
    width = int(single.shape[0])
    depth = sum(1 for n in state if n.startswith("layers.") and n.endswith(".weight"))
    if members is None:
        check(state, width, depth, dtype, label=where)
    else:
        check_stacked(state, members, width, depth, dtype, label=where)
    return {n: state[n] for n in names(depth)}, width, depth, dtype, members
