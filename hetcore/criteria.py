"""Comparing the two frameworks (framework-neutral: numpy and scipy).

Three kinds of comparison live here, each with its bound and the reason for it:

- single-step quantities (forward outputs, loss, gradients, one SGD step, weights after a
  short run) against a fixed bound per dtype, `SINGLE_STEP`;
- trajectories (loss per epoch, final weights, the fitted band after training) against the
  **one-ulp floor**: the gap between two runs of one framework whose initial weights differ
  by one ulp. A training run that amplifies rounding differences (the lecture's float32 run
  sits at the edge of stability, and its loss spikes turn a 1e-8 difference into 1e-1) does
  the same to a one-ulp nudge, so the floor says how far apart two runs that differ only by
  rounding can drift, epoch by epoch, for these very settings;
- the distance of each float32 run from a float64 reference, which both frameworks must
  keep alike (`reference_check`).

Every check returns a `Check` whose message names the quantity (a tensor's name, `mu`,
`loss`, ...), the largest difference, where it is (an index or an epoch), both values there
and the bound. `compare` is the summary that `train.py --framework both` writes to
`parity.json`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from scipy.special import ndtri

from hetcore import metrics
from hetcore.outputs import jsonable

if TYPE_CHECKING:
    from hetcore.driver import RunResult

LABELS = ("jax", "torch")
DTYPES = ("float32", "float64")


def unit_roundoff(dtype: str) -> float:
    """Machine epsilon of `dtype` (the spacing of floats at 1.0)."""
    return float(np.finfo(dtype).eps)


@dataclass(frozen=True)
class Bound:
    """A tolerance and the reason for it: |a - b| <= tol * max(1, |a|max, |b|max) per tensor.

    The scale is the larger of 1 and the tensor's own magnitude: every quantity compared
    here (inputs in [-3, 3], outputs, losses, gradients and weights) is O(1) or smaller, so
    the bound is absolute for them, and relative for anything larger.
    """

    tol: float
    reason: str


# Single-step quantities: forward outputs, loss, every gradient, one SGD step.
SINGLE_STEP = {
    "float64": Bound(
        1e-12,
        "float64 rounding: a length-n sum errs by about sqrt(n)*u (u = 2.2e-16), "
        "~1e-14 for the longest sum here (n <= 4096 points or units); compounded over at "
        "most ~10 stages (depth 4, heads, loss, the backward pass) and two frameworks, "
        "~1e-13; x10 margin. Measured worst over widths 1..512, depths 1..4, 1..2000 "
        "points: 9e-16. Any real mismatch (a missing eps, a transposed kernel) is >= 1e-8.",
    ),
    "float32": Bound(
        1e-5,
        "float32 rounding: sqrt(n)*u (u = 1.2e-7) is ~4e-6 for n = 2048; the worst "
        "measured over widths 1..512, depths 1..4 and 1..2000 points is 2.6e-6, a bias "
        "gradient where a ReLU pre-activation within rounding of 0 flipped for one point "
        "(moving the gradient by that point's share, ~1/N); forward and loss: <= 3.5e-7.",
    ),
}

# The lecture's 500-epoch run in float64: rounding (1e-16 per step) amplified by the loss
# spikes, which multiply a difference by up to ~1e9 (measured: 2.7e-7 in the loss history
# at a spike, 2e-10 in weights, 1e-9 in sigma). 1e-6 is the target and leaves
# about 4x over the worst measured value; where the settings amplify rounding more than
# this, the one-ulp floor is the bound instead (see `trajectory_bound`).
FLOAT64_TRAJECTORY = Bound(
    1e-6,
    "float64 run: 1e-16 rounding amplified by the loss spikes (lecture measured 2.7e-7 in "
    "loss, 2e-10 in weights, 1e-9 in sigma); the one-ulp floor takes over where the "
    "dynamics amplify more",
)

# The one-ulp criterion (trajectories).
FLOOR_FACTOR = 10.0
FLOOR_FACTOR_REASON = (
    "one decade: at a given epoch, one-ulp runs differ from each other by up to ~7x "
    "(lecture float32, epochs 0-260)"
)
FLOOR_LAG = 5
FLOOR_LAG_REASON = (
    "5 epochs: the epoch at which a one-ulp gap first reaches a given size varies by up to "
    "+-3 epochs between one-ulp runs (lecture float32, sizes 1e-7..1e-3)"
)
DECORRELATED = 1e-4
DECORRELATED_REASON = (
    "once a one-ulp gap passes 1e-4 of the quantity's magnitude, one loss spike (which "
    "multiplies gaps by up to ~1e4 in the lecture's float32 run) can decorrelate two "
    "rounding-twin runs; from then on gaps are bounded only by the size of the excursions, "
    "x10 the largest one-ulp gap of the whole run"
)
MEAN_FACTOR = 5.0
MEAN_MIN_EPOCHS = 50
MEAN_REASON = (
    "after the twins decorrelate, the mean gap over that phase must stay within 5x the "
    "largest mean one-ulp twin gap: over the lecture's float32 epochs 255-499, 5 "
    "cross-framework runs averaged 0.17-0.47 and 8 twins 0.15-0.46 (worst pairing 3.2x); "
    "checked when the phase has at least 50 epochs"
)
ROUNDING_ULPS = 4.0
ROUNDING_REASON = (
    "the floor is never below 4 ulps of the quantity's running magnitude: a loss that is a "
    "mean of N terms is already that far apart when computed in two summation orders"
)


@dataclass
class Check:
    """One compared quantity: the largest difference, where, and whether it is in bound."""

    quantity: str
    dtype: str
    max_abs: float
    max_rel: float
    bound: float
    ok: bool
    where: str
    detail: str
    reason: str = ""
    kind: str = "single-step"
    info: dict = field(default_factory=dict)

    def message(self) -> str:
        verdict = "ok" if self.ok else "FAIL"
        return (
            f"{self.quantity} [{self.dtype}]: max |diff| {self.max_abs:.3g} at {self.where}"
            f" ({self.detail}); rel {self.max_rel:.3g}; bound {self.bound:.3g}: {verdict}"
        )

    def to_dict(self) -> dict:
        """JSON-ready: non-finite numbers as strings ("inf"), since JSON has none."""
        return jsonable(asdict(self))


def _as64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def diff(a, b) -> dict:
    """Largest absolute and relative difference of two arrays of one shape, and where.

    Non-finite values count as an infinite difference unless both sides hold the same one.
    Returns max_abs, max_rel, at (flat index), index (tuple) and the values a and b there.
    """
    a, b = _as64(a), _as64(b)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    if a.size == 0:
        return {"max_abs": 0.0, "max_rel": 0.0, "at": 0, "index": (), "a": 0.0, "b": 0.0}
    with np.errstate(invalid="ignore", over="ignore"):
        d = np.abs(a - b)
        same = (a == b) | (np.isnan(a) & np.isnan(b))
        d = np.where(same, 0.0, np.where(np.isnan(d), np.inf, d))
        scale = np.maximum(np.abs(a), np.abs(b))
        rel = np.where(d == 0, 0.0, np.where(scale > 0, d / np.where(scale > 0, scale, 1), np.inf))
    flat = d.reshape(-1)
    i = int(np.argmax(flat))
    return {
        "max_abs": float(flat[i]),
        "max_rel": float(np.max(rel)),
        "at": i,
        "index": tuple(int(k) for k in np.unravel_index(i, a.shape)),
        "a": float(a.reshape(-1)[i]),
        "b": float(b.reshape(-1)[i]),
    }


def _where(index: tuple) -> str:
    return "index " + (str(index) if len(index) != 1 else f"({index[0]},)") if index else "scalar"


def _values(labels, va: float, vb: float) -> str:
    return f"{labels[0]} {va!r}, {labels[1]} {vb!r}"


def magnitude(*arrays) -> float:
    """The largest finite |value| over the arrays (0 if none)."""
    m = 0.0
    for a in arrays:
        a = _as64(a)
        finite = a[np.isfinite(a)]
        if finite.size:
            m = max(m, float(np.max(np.abs(finite))))
    return m


def check_close(quantity: str, a, b, bound: Bound, dtype: str,
                labels: tuple[str, str] = LABELS, kind: str = "single-step") -> Check:
    """Compare two arrays under `bound` (see Bound for the scale)."""
    a64, b64 = _as64(a), _as64(b)
    if a64.shape != b64.shape:
        return Check(quantity, dtype, float("inf"), float("inf"), 0.0, False, "shape",
                     f"{labels[0]} {a64.shape}, {labels[1]} {b64.shape}", bound.reason, kind)
    d = diff(a64, b64)
    limit = bound.tol * max(1.0, magnitude(a64, b64))
    return Check(
        quantity=quantity, dtype=dtype, max_abs=d["max_abs"], max_rel=d["max_rel"],
        bound=limit, ok=bool(d["max_abs"] <= limit), where=_where(d["index"]),
        detail=_values(labels, d["a"], d["b"]), reason=bound.reason, kind=kind,
    )


def check_states(prefix: str, a: dict, b: dict, bound: Bound, dtype: str,
                 labels: tuple[str, str] = LABELS, kind: str = "single-step") -> list[Check]:
    """check_close for every tensor of two state dicts; a name on one side only fails."""
    checks = []
    for name in sorted(set(a) ^ set(b)):
        side = labels[0] if name in a else labels[1]
        checks.append(Check(f"{prefix} {name}", dtype, float("inf"), float("inf"), 0.0, False,
                            "names", f"only {side} has it", bound.reason, kind))
    for name in a:
        if name in b:
            checks.append(check_close(f"{prefix} {name}", a[name], b[name], bound, dtype,
                                      labels, kind))
    return checks


def failures(checks: list[Check]) -> list[Check]:
    return [c for c in checks if not c.ok]


def assert_checks(checks: list[Check]) -> None:
    """Raise AssertionError listing every failed check (message names tensor, diff, place)."""
    bad = failures(checks)
    if bad:
        raise AssertionError(
            f"{len(bad)} of {len(checks)} checks failed:\n"
            + "\n".join("  " + c.message() for c in bad)
        )


# ---------------------------------------------------------------------------------------
# The one-ulp floor.


def ulp_perturb(state: dict, seed: int) -> dict[str, np.ndarray]:
    """Every nonzero element moved by one ulp, up or down at random (numpy PCG64, `seed`).

    Zeros stay zero: their next float is subnormal, which would change the run's speed and,
    on GPUs that flush subnormals, not change the value at all.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for name, a in state.items():
        a = np.asarray(a)
        up = rng.random(a.shape) < 0.5
        moved = np.where(up, np.nextafter(a, np.inf), np.nextafter(a, -np.inf)).astype(a.dtype)
        out[name] = np.where(a == 0, a, moved)
    return out


def running_max(a) -> np.ndarray:
    a = _as64(a)
    return np.maximum.accumulate(np.where(np.isnan(a), np.inf, a))


def gap(a, b) -> np.ndarray:
    """|a - b| per element in float64, NaN as infinite."""
    with np.errstate(invalid="ignore"):
        d = np.abs(_as64(a) - _as64(b))
    return np.where(np.isnan(d), np.inf, d)


def floor_envelope(floor_gaps: list, lag: int = FLOOR_LAG) -> np.ndarray:
    """max over the one-ulp gaps of their running max, looked up `lag` epochs ahead."""
    env = np.max(np.stack([running_max(g) for g in floor_gaps]), axis=0)
    ahead = np.minimum(np.arange(env.size) + lag, env.size - 1)
    return env[ahead]


def trajectory_bound(floor_gaps: list, scale, dtype: str, factor: float = FLOOR_FACTOR,
                     lag: int = FLOOR_LAG, fixed: float = 0.0) -> np.ndarray:
    """The bound per epoch on the running max of a cross-framework gap.

    While the one-ulp runs are still correlated: factor * max(one-ulp envelope `lag` epochs
    ahead, ROUNDING_ULPS ulps of the running magnitude of `scale`). From the epoch at which
    that envelope passes DECORRELATED * magnitude: factor * the largest one-ulp gap of the
    whole run. Never below `fixed` * max(1, magnitude).
    """
    mag = running_max(np.abs(_as64(scale)))
    rounding = ROUNDING_ULPS * unit_roundoff(dtype) * mag
    env = floor_envelope(floor_gaps, lag)
    bound = factor * np.maximum(env, rounding)
    decorrelated = env >= DECORRELATED * mag
    bound = np.where(decorrelated, factor * max(env[-1], float(np.max(rounding))), bound)
    return np.maximum(bound, fixed * np.maximum(1.0, mag))


def factor_mean(twin_mean: float, dtype: str, magnitude: float) -> float:
    """Bound on a mean gap over the decorrelated phase (MEAN_REASON)."""
    return MEAN_FACTOR * max(twin_mean, ROUNDING_ULPS * unit_roundoff(dtype) * magnitude)


def decorrelation_epoch(floor_gaps: list, scale, lag: int = FLOOR_LAG) -> int | None:
    """First epoch from which the one-ulp envelope (`lag` ahead) passes DECORRELATED times
    the running magnitude of `scale`; None if the runs stay correlated throughout."""
    env = floor_envelope(floor_gaps, lag)
    hit = np.flatnonzero(env >= DECORRELATED * running_max(np.abs(_as64(scale))))
    return int(hit[0]) if hit.size else None


def floor_check(quantity: str, a, b, floor_gaps: list, dtype: str,
                labels: tuple[str, str] = LABELS, fixed: float = 0.0,
                factor: float = FLOOR_FACTOR, lag: int = FLOOR_LAG) -> tuple[Check, dict]:
    """Cross-framework gap of two per-epoch curves against the one-ulp floor.

    Args:
      a, b: the two frameworks' curves (e.g. loss per epoch), same length.
      floor_gaps: per-epoch gaps between a framework's run and its one-ulp twin (any number,
        both frameworks' ideally).
      fixed: a bound that holds regardless of the floor (float64: FLOAT64_TRAJECTORY.tol).

    Returns:
      The Check (where = the first epoch out of bound, else the epoch of the largest
      gap-to-bound ratio while the runs are correlated) and the curves (gap, running gap,
      floor envelope, bound) for reports and figures.
    """
    g = gap(a, b)
    run = running_max(g)
    env = floor_envelope(floor_gaps, lag)
    scale = np.maximum(np.abs(_as64(a)), np.abs(_as64(b)))
    bound = trajectory_bound(floor_gaps, scale, dtype, factor, lag, fixed)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(run == 0, 0.0, run / bound)
    if fixed:  # how the gap compares with the floor alone, for the record
        alone = trajectory_bound(floor_gaps, scale, dtype, factor, lag)
        with np.errstate(divide="ignore", invalid="ignore"):
            floor_only = float(np.max(np.where(run == 0, 0.0, run / alone)))
    else:
        floor_only = float(np.max(ratio))
    t_dec = decorrelation_epoch(floor_gaps, scale, lag)
    mean = {}
    if t_dec is not None and g.size - t_dec >= MEAN_MIN_EPOCHS:
        mag = float(np.max(running_max(scale)))
        twin_mean = max(float(np.mean(f[t_dec:])) for f in floor_gaps)
        mean = {"mean_gap": float(np.mean(g[t_dec:])), "mean_twin_gap": twin_mean,
                "mean_bound": max(factor_mean(twin_mean, dtype, mag), fixed * max(1.0, mag))}
    mean_ok = not mean or mean["mean_gap"] <= mean["mean_bound"]
    correlated = ratio[:t_dec] if t_dec else ratio
    worst = int(np.argmax(correlated)) if correlated.size else int(np.argmax(ratio))
    bad = np.flatnonzero(ratio > 1)
    at = int(bad[0]) if bad.size else worst
    d = diff(a, b)
    phase = ("rounding twins stay correlated throughout" if t_dec is None
             else f"rounding twins decorrelate from epoch {t_dec}")
    check = Check(
        quantity=quantity, dtype=dtype, max_abs=d["max_abs"], max_rel=d["max_rel"],
        bound=float(bound[at]), ok=not bad.size and mean_ok,
        where=f"epoch {at}",
        detail=(f"gap so far {run[at]:.3g} vs one-ulp floor {env[at]:.3g} "
                f"(x{factor:g}, {lag} epochs ahead), ratio to bound {ratio[at]:.2g}; {phase}; "
                f"largest gap at epoch {d['at']}: " + _values(labels, d["a"], d["b"])),
        reason=(f"{FLOOR_FACTOR_REASON}; {FLOOR_LAG_REASON}; {DECORRELATED_REASON}; "
                f"{MEAN_REASON}; {ROUNDING_REASON}"),
        kind="trajectory",
        info={"decorrelated_from": t_dec, "worst_ratio_correlated": float(ratio[worst]),
              "worst_ratio_epoch": worst, "worst_ratio_floor_only": floor_only,
              "per_epoch_ok": not bad.size, **mean},
    )
    if not mean_ok:
        check.where = f"epochs {t_dec}-{g.size - 1}"
        check.detail = (f"mean gap {mean['mean_gap']:.3g} over the decorrelated phase vs "
                        f"largest mean twin gap {mean['mean_twin_gap']:.3g} "
                        f"(x{MEAN_FACTOR:g}); " + check.detail)
    curves = {"gap": g, "running_gap": run, "floor": env, "bound": bound, "ratio": ratio,
              "scale": scale}
    return check, curves


def phase_checks(check: Check, curves: dict) -> list[Check]:
    """floor_check's verdict as table rows, one per phase: while the one-ulp twins stay
    correlated, and after they decorrelate. Each row: the largest gap of its phase, the
    largest bound of its phase, and whether every epoch of it was in bound."""
    g, bound, ratio, scale = (curves[k] for k in ("gap", "bound", "ratio", "scale"))
    t_dec = check.info["decorrelated_from"]
    spans = [(0, g.size, None)]
    if t_dec is not None:
        spans = ([(0, t_dec, "twins correlated")] if t_dec > 0 else []) + [
            (t_dec, g.size, "twins decorrelated")]
    rows = []
    for lo, hi, phase in spans:
        seg = slice(lo, hi)
        i = lo + int(np.argmax(g[seg]))
        bad = np.flatnonzero(ratio[seg] > 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.where(g[seg] == 0, 0.0, g[seg] / np.where(scale[seg] > 0, scale[seg], 1.0))
        worst = lo + int(np.argmax(ratio[seg]))
        at = lo + int(bad[0]) if bad.size else worst
        name = (check.quantity if phase is None
                else f"{check.quantity}, epochs {lo}-{hi - 1} ({phase})")
        rows.append(Check(
            quantity=name, dtype=check.dtype, max_abs=float(g[i]), max_rel=float(np.max(rel)),
            bound=float(np.max(bound[seg])), ok=not bad.size, where=f"epoch {at}",
            detail=(f"gap so far {curves['running_gap'][at]:.3g}, bound there "
                    f"{bound[at]:.3g} (ratio {ratio[at]:.2g}); one-ulp floor "
                    f"{curves['floor'][at]:.3g}; largest gap of the phase at epoch {i}"),
            reason=check.reason, kind="trajectory", info={"epochs": [lo, hi - 1]},
        ))
    info = check.info
    if "mean_gap" in info:
        lo = info["decorrelated_from"]
        rows.append(Check(
            quantity=f"{check.quantity}, epochs {lo}-{g.size - 1}, mean gap",
            dtype=check.dtype, max_abs=info["mean_gap"], max_rel=float("nan"),
            bound=info["mean_bound"], ok=info["mean_gap"] <= info["mean_bound"],
            where=f"epochs {lo}-{g.size - 1}",
            detail=f"largest mean one-ulp twin gap {info['mean_twin_gap']:.3g}",
            reason=MEAN_REASON, kind="trajectory"))
    return rows


def final_floor_check(quantity: str, a, b, floor_pairs: list, dtype: str,
                      labels: tuple[str, str] = LABELS, fixed: float = 0.0,
                      factor: float = FLOOR_FACTOR) -> Check:
    """An end-of-run array (weights, sigma on a grid) against its one-ulp floor.

    floor_pairs: (base, one-ulp twin) arrays of the same quantity, from either framework.
    Bound: factor * max(largest one-ulp gap, ROUNDING_ULPS ulps of the magnitude), never
    below `fixed` * max(1, magnitude).
    """
    a64, b64 = _as64(a), _as64(b)
    if a64.shape != b64.shape:
        return Check(quantity, dtype, float("inf"), float("inf"), 0.0, False, "shape",
                     f"{labels[0]} {a64.shape}, {labels[1]} {b64.shape}", "", "trajectory")
    mag = magnitude(a64, b64)
    floor = max((float(np.max(gap(p, q))) for p, q in floor_pairs), default=0.0)
    limit = factor * max(floor, ROUNDING_ULPS * unit_roundoff(dtype) * mag)
    limit = max(limit, fixed * max(1.0, mag))
    d = diff(a64, b64)
    return Check(
        quantity=quantity, dtype=dtype, max_abs=d["max_abs"], max_rel=d["max_rel"],
        bound=limit, ok=bool(d["max_abs"] <= limit), where=_where(d["index"]),
        detail=f"{_values(labels, d['a'], d['b'])}; one-ulp floor {floor:.3g}",
        reason=f"{FLOOR_FACTOR_REASON}; {ROUNDING_REASON}", kind="trajectory",
    )


REFERENCE_FALLBACK_REASON = (
    "where the two frameworks part by more than a one-ulp nudge of the initial weights "
    "predicts (mini-batch and adaptive runs round differently at every update, which a "
    "single initial nudge does not reproduce; how far depends on the CPU's kernels), the "
    "gap is rounding if each framework's float32 result stays as close to the float64 run "
    "as the other framework's run and one-ulp twins do, or within 4 ulps of an O(1) value "
    "(x10): a bug such as a lost update moves one framework far from the exact result "
    "(the one found so far: 7-40%), rounding moves both by a few ulps of the weights' scale"
)


def final_reference_fallback(check: Check, a, b, reference, twins_a: list, twins_b: list,
                             factor: float = FLOOR_FACTOR) -> Check:
    """`check` (a final_floor_check of float32 arrays a, b) as it stands when it passed;
    when it failed, the float64 reference decides (REFERENCE_FALLBACK_REASON): each side's
    largest distance from `reference` must be within `factor` of the largest distance of
    the other framework's runs (its run and its one-ulp twins, twins_b for a and twins_a
    for b), never below 4 ulps of max(1, the magnitude) (Bound's scale)."""
    if check.ok:
        return check
    ref = _as64(reference)
    dist = lambda v: float(np.max(np.abs(_as64(v) - ref))) if ref.size else 0.0  # noqa: E731
    da, db = dist(a), dist(b)
    # Bound's scale: absolute for the O(1) quantities compared here, relative beyond
    floor = ROUNDING_ULPS * unit_roundoff(check.dtype) * max(1.0, magnitude(a, b))
    limit_a = factor * max([db, floor] + [dist(t) for t in twins_b])
    limit_b = factor * max([da, floor] + [dist(t) for t in twins_a])
    ok = da <= limit_a and db <= limit_b
    return Check(
        quantity=check.quantity, dtype=check.dtype, max_abs=check.max_abs,
        max_rel=check.max_rel, bound=check.bound, ok=ok, where=check.where,
        detail=(f"{check.detail}; beyond the one-ulp bound, so judged by the float64 run: "
                f"distance jax {da:.3g} (limit {limit_a:.3g}), torch {db:.3g} (limit "
                f"{limit_b:.3g})"),
        reason=REFERENCE_FALLBACK_REASON, kind="trajectory",
        info={"distance_from_float64": [da, db], "limits": [limit_a, limit_b]})


def reference_check(label: str, run, others: list, reference, dtype: str,
                    factor: float = FLOOR_FACTOR, lag: int = FLOOR_LAG,
                    own_twins: list = ()) -> tuple[Check, dict]:
    """Does a float32 curve stay as close to the float64 reference as the other float32 runs?

    run: this framework's float32 curve; others: the other framework's float32 curve and
    the one-ulp runs (any framework); reference: the float64 curve. The running max of
    |run - reference| must stay within `factor` of the largest running distance of the
    others, `lag` epochs ahead (or of ROUNDING_ULPS ulps); once the others have left the
    reference (DECORRELATED), its mean distance must stay within MEAN_FACTOR of theirs.
    Applied to each framework in turn, this says both stay as close to float64 as each other.

    own_twins: this framework's one-ulp runs. How far a one-ulp nudge moves this very run
    (a ReLU that flips, say) is also allowed: a run is only defined to within that, so its
    distance from float64 cannot be asked to be smaller.
    """
    mine = gap(run, reference)
    theirs = [gap(o, reference) for o in others] + [gap(run, t) for t in own_twins]
    check, curves = floor_check(
        f"loss vs float64 reference ({label})", run, reference, theirs, dtype,
        labels=(f"{label} {dtype}", "float64"), factor=factor, lag=lag,
    )
    check.detail = check.detail.replace("one-ulp floor", "other float32 runs")
    curves["distance"] = mine
    return check, curves


# ---------------------------------------------------------------------------------------
# Summary of two finished runs (train.py --framework both).


def compare(a: "RunResult", b: "RunResult", y=None, held_y=None,
            run_metrics: tuple[dict, dict] | None = None) -> dict:
    """Largest differences between two runs, per quantity and per tensor, and where.

    With the training data's y (and the held-out data's, held_y, when the runs predicted
    there), also each metric of the two runs' predictions against the reach of their
    predictions' own gaps (metric_checks): `metrics`. run_metrics: the runs' metrics.json
    blocks ({"final": ..., "test": ...}), computed here when not given."""
    out = {
        "frameworks": [a.framework, b.framework],
        "dtype": a.dtype,
        "epochs": len(a.loss_history),
        "initial_weights_identical": all(
            np.array_equal(a.initial_weights[n], b.initial_weights[n]) for n in a.initial_weights
        ),
        "loss_history": diff(a.loss_history, b.loss_history),
        "final_loss": diff([a.final_loss], [b.final_loss]),
        "mu": diff(a.mu, b.mu),
        "sigma": diff(a.sigma, b.sigma),
        "weights": {n: diff(a.weights[n], b.weights[n]) for n in a.weights},
    }
    for key in ("loss_history", "final_loss", "mu", "sigma"):
        out[key]["index"] = list(out[key]["index"])
    for d in out["weights"].values():
        d["index"] = list(d["index"])
    g = gap(a.loss_history, b.loss_history)
    out["loss_gap_per_epoch"] = [float(v) for v in g]
    if y is not None:
        checks = run_metric_checks(a, b, y, held_y, run_metrics=run_metrics)
        out["metrics"] = {"pass": not failures(checks), "reason": METRICS_REASON,
                          "checks": [c.to_dict() for c in checks]}
    return out


# ---------------------------------------------------------------------------------------
# The metrics of two frameworks' predictions (hetcore.metrics): how far apart they may be,
# given how far apart the predictions are.

METRICS_REASON = (
    "each metric is a function of the predictions (mu, sigma) at the points, so it can "
    "differ between the frameworks only as far as their predictions' difference moves it: "
    "the bound is that reach, for every point's mu and sigma anywhere within the given "
    "distance of the first framework's. Scores by their Lipschitz constants over that box "
    "(CRPS: 1 in mu, 1/sqrt(pi) in sigma; check score: max(q, 1-q) per quantile; interval "
    "score: 2/alpha - 1 per interval end; the log score by its gradient's largest size in "
    "the box; sharpness and RMSEs by the triangle inequality); counted metrics (coverage, "
    "calibration errors, miscalibration area) by the points whose standardised residual "
    "can cross a level's interval end, 1/N of a proportion each"
)


SPLIT_NAMES = {"final": "training data", "test": "held-out data"}  # metrics.json's blocks


def _z_range(y, mu, sigma, d_mu, d_sigma) -> tuple[np.ndarray, np.ndarray]:
    """The smallest and largest (mu' - y) / sigma' over |mu' - mu| <= d_mu, |sigma' -
    sigma| <= d_sigma (-inf, inf where sigma' may reach 0)."""
    r = mu - y
    lo_s = sigma - d_sigma
    corners = np.stack([(r + a) / s for a in (-d_mu, d_mu) for s in (lo_s, sigma + d_sigma)])
    lo, hi = corners.min(0), corners.max(0)
    open_ = lo_s <= 0
    return np.where(open_, -np.inf, lo), np.where(open_, np.inf, hi)


def _crossing(lo: np.ndarray, hi: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """For each threshold, the number of ranges [lo, hi] that hold it."""
    lo, hi = np.sort(lo), np.sort(hi)
    return (np.searchsorted(lo, thresholds, side="right")
            - np.searchsorted(hi, thresholds, side="left"))


def metric_reach(y, mu, sigma, d_mu, d_sigma) -> dict[str, float]:
    """How far each metric of hetcore.metrics.final_metrics (but `loss`) can move from its
    value at (mu, sigma) when every point's mu moves by at most d_mu and its sigma by at
    most d_sigma (arrays of the points' size, or scalars); METRICS_REASON says how."""
    y, mu, sigma = (_as64(a).reshape(-1) for a in (y, mu, sigma))
    n = y.size
    d_mu, d_sigma = (np.broadcast_to(_as64(d).reshape(-1) if np.ndim(d) else _as64(d), (n,))
                     for d in (d_mu, d_sigma))
    s_min = sigma - d_sigma
    with np.errstate(divide="ignore", invalid="ignore"):
        z_max = np.where(s_min > 0, (np.abs(mu - y) + d_mu) / s_min, np.inf)
        nll = np.where(s_min > 0, (z_max * d_mu + np.maximum(1.0, z_max ** 2) * d_sigma)
                       / s_min, np.inf)
    zq = np.abs(ndtri(metrics.SCORE_LEVELS))
    check = np.mean(np.maximum(metrics.SCORE_LEVELS, 1 - metrics.SCORE_LEVELS)[:, None]
                    * (d_mu[None, :] + zq[:, None] * d_sigma[None, :]))
    zp = ndtri(0.5 + metrics.SCORE_LEVELS / 2)
    interval = np.mean((2 / (1 - metrics.SCORE_LEVELS) - 1)[:, None] * 2
                       * (d_mu[None, :] + zp[:, None] * d_sigma[None, :]))
    z_lo, z_hi = _z_range(y, mu, sigma, d_mu, d_sigma)
    a_lo = np.where((z_lo <= 0) & (z_hi >= 0), 0.0, np.minimum(np.abs(z_lo), np.abs(z_hi)))
    a_hi = np.maximum(np.abs(z_lo), np.abs(z_hi))
    lower, upper = metrics.interval_bounds()
    k = (_crossing(z_lo, z_hi, lower) + _crossing(z_lo, z_hi, upper)) / n
    k_area = _crossing(a_lo, a_hi, upper) / n
    h = np.diff(metrics.EXPECTED)
    reach = {
        "rmse": float(np.sqrt(np.mean(d_mu ** 2))),
        "nll": float(np.mean(nll)),
        "nll_full": float(np.mean(nll)),
        "crps": float(np.mean(d_mu + d_sigma / np.sqrt(np.pi))),
        "check_score": float(check),
        "interval_score": float(interval),
        "sharpness": float(np.sqrt(np.mean(d_sigma ** 2))),
        "mace": float(np.mean(k)),
        "rmsce": float(np.sqrt(np.mean(k ** 2))),
        "miscalibration_area": float(np.sum(h * (k_area[:-1] + k_area[1:]) / 2)),
        "sigma_mae": float(np.mean(d_sigma)),
        "mean_rmse": float(np.sqrt(np.mean(d_mu ** 2))),
    }
    for j in (1, 2, 3):
        reach[f"coverage_{j}sigma"] = float(_crossing(a_lo, a_hi, np.array([float(j)]))[0] / n)
    return reach


def metric_checks(split: str, metrics_a: dict, metrics_b: dict, y, pred_a, pred_b, d_mu,
                  d_sigma, dtype: str, basis: str, labels: tuple[str, str] = LABELS
                  ) -> list[Check]:
    """One Check per metric of two frameworks' predictions on the same data.

    pred_a, pred_b: (mu, sigma) of each; d_mu, d_sigma: how far apart the predictions may
    be (the actual gaps, or a parity bound on them), said in `basis`; the bound of each
    metric is metric_reach from the first framework's predictions plus 4 ulps of the
    metric's magnitude (ROUNDING_REASON)."""
    reach = metric_reach(y, pred_a[0], pred_a[1], d_mu, d_sigma)
    checks = []
    for key, limit in reach.items():
        if key not in metrics_a or key not in metrics_b:
            continue
        va, vb = float(metrics_a[key]), float(metrics_b[key])
        mag = max(abs(va), abs(vb))
        # The reach plus the rounding of computing the metric and the reach themselves: a
        # counted metric may move by exactly its reach (a point crossing an interval's
        # end), which float64 may round an ulp either way.
        bound = limit * (1 + 1e-12) + ROUNDING_ULPS * unit_roundoff("float64") * mag
        gap_ = abs(va - vb)
        checks.append(Check(
            quantity=f"{key} ({SPLIT_NAMES.get(split, split)})", dtype=dtype, max_abs=gap_,
            max_rel=gap_ / mag if mag else 0.0, bound=bound, ok=bool(gap_ <= bound),
            where="metric", detail=f"{_values(labels, va, vb)}; {basis}",
            reason=METRICS_REASON, kind="metric"))
    return checks


def run_metric_checks(a: "RunResult", b: "RunResult", y, held_y=None, d_mu=None, d_sigma=None,
                      basis: str | None = None, run_metrics: tuple[dict, dict] | None = None
                      ) -> list[Check]:
    """metric_checks of two runs' predictions on the training data (y) and, when both
    predicted there, the held-out data (held_y). d_mu, d_sigma: how far apart the
    predictions may be, said in `basis`; None: their own gaps at each point. run_metrics:
    the runs' metrics.json blocks ({"final": ..., "test": ...}), computed here when not
    given."""
    splits = {"final": (y, (a.mu, a.sigma), (b.mu, b.sigma))}
    if held_y is not None and a.held_out is not None and b.held_out is not None:
        splits["test"] = (held_y, (a.held_out.mu, a.held_out_sigma),
                          (b.held_out.mu, b.held_out_sigma))
    own = d_mu is None
    if own:
        basis = "bound: the reach of the predictions' own gaps at each point"
    checks = []
    for split, (yy, pa, pb) in splits.items():
        if run_metrics is None:
            ma, mb = (metrics.final_metrics(yy, p[0], _as64(p[1]) ** 2, None) for p in (pa, pb))
        else:
            ma, mb = run_metrics[0][split], run_metrics[1][split]
        dm, ds = ((np.abs(_as64(pa[0]) - pb[0]), np.abs(_as64(pa[1]) - pb[1])) if own
                  else (d_mu, d_sigma))
        checks += metric_checks(split, ma, mb, yy, pa, pb, dm, ds, a.dtype, basis,
                                (a.framework, b.framework))
    return checks
