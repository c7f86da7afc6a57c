"""The comparison machinery itself (hetcore.criteria): messages, ulps, the floor criterion.

Each test feeds hand-made numbers whose answer is known, so that every assertion can fail.
"""

import json

import numpy as np
import pytest

from hetcore import criteria
from hetcore.driver import RunResult


def test_message_names_tensor_difference_and_place():
    a = np.zeros((3, 4))
    b = a.copy()
    b[2, 1] = 3e-5
    c = criteria.check_close("grad layers.2.weight", a, b, criteria.SINGLE_STEP["float32"], "float32")
    assert not c.ok
    msg = c.message()
    for part in ("grad layers.2.weight", "float32", "3e-05", "index (2, 1)", "FAIL"):
        assert part in msg, (part, msg)
    with pytest.raises(AssertionError, match=r"grad layers\.2\.weight.*index \(2, 1\)"):
        criteria.assert_checks([c])


def test_bound_is_absolute_below_one_and_relative_above():
    bound = criteria.SINGLE_STEP["float32"]
    assert criteria.check_close("q", [0.5], [0.5 + 9e-6], bound, "float32").ok
    assert not criteria.check_close("q", [0.5], [0.5 + 2e-5], bound, "float32").ok
    assert criteria.check_close("q", [100.0], [100.0 + 9e-4], bound, "float32").ok
    assert not criteria.check_close("q", [100.0], [100.0 + 2e-3], bound, "float32").ok


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_values_fail(bad):
    c = criteria.check_close("mu", [1.0, 2.0], [1.0, bad], criteria.SINGLE_STEP["float64"], "float64")
    assert not c.ok and c.where == "index (1,)"
    same = criteria.check_close("mu", [1.0, bad], [1.0, bad], criteria.SINGLE_STEP["float64"],
                              "float64")
    assert same.ok


def test_missing_tensor_and_shape_mismatch_fail():
    bound = criteria.SINGLE_STEP["float64"]
    checks = criteria.check_states("grad", {"a": np.zeros(2), "b": np.zeros(3)},
                                 {"a": np.zeros(2), "b": np.zeros(4)}, bound, "float64")
    assert [c.ok for c in checks] == [True, False]
    checks = criteria.check_states("grad", {"a": np.zeros(2)}, {"a": np.zeros(2), "c": 1.0},
                                 bound, "float64")
    assert criteria.failures(checks)
    assert "grad c" in criteria.failures(checks)[0].message()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_ulp_perturb_moves_every_element_by_one_ulp(dtype):
    rng = np.random.default_rng(0)
    state = {"w": rng.standard_normal((50, 7)).astype(dtype), "b": np.zeros(3, dtype)}
    twin = criteria.ulp_perturb(state, seed=1)
    w, t = state["w"], twin["w"]
    assert t.dtype == w.dtype
    up = t == np.nextafter(w, np.inf)
    down = t == np.nextafter(w, -np.inf)
    assert np.all(up ^ down)
    assert 0.3 < up.mean() < 0.7  # both directions
    assert np.array_equal(twin["b"], state["b"])  # zeros stay
    again = criteria.ulp_perturb(state, seed=1)
    assert all(np.array_equal(again[k], twin[k]) for k in state)


def curves(epochs=300, onset=200, seed=0):
    """A loss curve and rounding-level gaps that grow 30% per epoch from `onset`."""
    rng = np.random.default_rng(seed)
    loss = np.linspace(0.3, -1.0, epochs)
    growth = np.where(np.arange(epochs) < onset, 1.0, 1.3 ** (np.arange(epochs) - onset))
    def g():
        return np.minimum(3e-8 * rng.random(epochs) * growth, 1.0)
    return loss, g


def test_floor_check_passes_rounding_twins_and_fails_an_offset():
    loss, g = curves()
    floors = [g(), g()]
    ok, cur = criteria.floor_check("loss", loss, loss + g(), floors, "float32")
    assert ok.ok, ok.message()
    assert ok.info["decorrelated_from"] is not None
    # a systematic difference of 1e-5 from epoch 0 on: 100x the rounding level
    bad, _ = criteria.floor_check("loss", loss, loss + 1e-5 + g(), floors, "float32")
    assert not bad.ok and bad.where == "epoch 0", bad.message()
    # a difference that starts mid-run, before the twins decorrelate
    late = loss + np.where(np.arange(loss.size) >= 120, 1e-4, 0.0)
    bad, _ = criteria.floor_check("loss", loss, late, floors, "float32")
    assert not bad.ok and bad.where == "epoch 120", bad.message()
    # diverging 30 epochs before the twins do
    loss2, g2 = curves(onset=170, seed=1)
    early, _ = criteria.floor_check("loss", loss, loss + g2(), floors, "float32")
    assert not early.ok, early.message()


def test_floor_check_fixed_bound_and_reference_check():
    loss, g = curves(onset=10**6)
    floors = [g()]
    c, _ = criteria.floor_check("loss", loss, loss + 5e-7, floors, "float64", fixed=1e-6)
    assert c.ok  # 5e-7 is far above float64 rounding but within the fixed 1e-6
    c, _ = criteria.floor_check("loss", loss, loss + 5e-7, floors, "float64")
    assert not c.ok
    ref = loss + 1e-9
    good, _ = criteria.reference_check("jax", loss + g(), [loss + g(), loss + g()], ref, "float32")
    assert good.ok, good.message()
    bad, _ = criteria.reference_check("jax", loss + 3e-5, [loss + g(), loss + g()], ref, "float32")
    assert not bad.ok and "jax" in bad.message()


def test_final_floor_check():
    a = np.linspace(0.1, 0.5, 11)
    twins = [(a, a + 1e-3), (a, a - 2e-3)]
    assert criteria.final_floor_check("sigma", a, a + 1.5e-2, twins, "float32").ok
    c = criteria.final_floor_check("sigma", a, a + 3e-2, twins, "float32")
    assert not c.ok and "one-ulp floor 0.002" in c.message()


def test_compare_keeps_its_keys_and_is_json():
    def run(shift):
        w = {"layers.0.weight": np.full((2, 1), 0.5 + shift)}
        return RunResult("jax", "cpu", "float64", np.array([1.0, 0.5 + shift]), w, w,
                         np.array([0.1, 0.2]), np.array([1.0, 2.0 + shift]), 0.4, 0.0, 0.0)
    out = criteria.compare(run(0.0), run(1e-3))
    for key in ("frameworks", "dtype", "epochs", "initial_weights_identical", "loss_history",
                "final_loss", "mu", "sigma", "weights", "loss_gap_per_epoch"):
        assert key in out
    assert out["loss_history"]["max_abs"] == pytest.approx(1e-3)
    assert out["loss_history"]["at"] == 1
    json.dumps(out, allow_nan=False)


def test_decorrelated_phase_is_judged_by_its_mean_gap():
    """After decorrelation a per-epoch bound can only be the excursion size; the mean gap
    over the phase must also stay within MEAN_FACTOR of the twins' mean gap."""
    rng = np.random.default_rng(3)
    epochs, onset = 400, 100
    t = np.arange(epochs)
    loss = np.linspace(0.3, -1.0, epochs)
    growth = np.where(t < onset, 1.0, 1.5 ** (t - onset))

    def g():  # rounding level, then growth to ~0.01 with one excursion of 0.1
        return np.minimum(3e-8 * rng.random(epochs) * growth, 0.01) + np.where(t == 300, 0.1, 0)

    floors = [g(), g()]
    ok, cur = criteria.floor_check("loss", loss, loss + g(), floors, "float32")
    assert ok.ok and "mean_gap" in ok.info, ok.message()
    rows = criteria.phase_checks(ok, cur)
    assert [r.quantity.split("(")[-1] for r in rows[:2]] == ["twins correlated)",
                                                            "twins decorrelated)"]
    assert rows[-1].quantity.endswith("mean gap") and all(r.ok for r in rows)
    # every epoch of the phase at half the largest excursion: in the per-epoch bound
    # (10x the excursion), but its mean is ~40x the twins'
    far = loss + np.where(t < 200, g(), 0.5)
    bad, cur = criteria.floor_check("loss", loss, far, floors, "float32")
    assert bad.info["per_epoch_ok"] and not bad.ok, bad.message()
    assert not criteria.phase_checks(bad, cur)[-1].ok


def test_reference_check_allows_what_a_one_ulp_nudge_moves_the_run():
    # Seen with scripts/parity.py on a small synthetic run: one ReLU flips at epoch 78 in
    # torch's float32 run but in none of the others, a 2e-6 step away from float64. Its own
    # one-ulp twin shows the same step relative to it, so the step is rounding's doing.
    epochs = np.arange(150)
    ref = -0.002 * epochs.astype(np.float64)
    close = ref + 1e-8
    jump = ref + np.where(epochs >= 78, 2e-6, 1e-8)
    others = [close, close + 1e-8, close - 1e-8]
    strict, _ = criteria.reference_check("torch", jump, others, ref, "float32")
    assert not strict.ok
    fair, _ = criteria.reference_check("torch", jump, others, ref, "float32", own_twins=[close])
    assert fair.ok, fair.message()


def test_reference_fallback_judges_a_gap_by_the_float64_run():
    ref = np.linspace(-0.01, 0.01, 50)  # small values: the one-ulp floor decides, not 4 ulps
    rng = np.random.default_rng(3)
    near = lambda s: ref + s * rng.standard_normal(50)  # noqa: E731
    a, b = near(1e-7), near(1e-7)  # apart by ~1e-7, each ~1e-7 from float64
    twins_a, twins_b = [a + 1e-10], [b + 1e-10]
    floor = criteria.final_floor_check("w", a, b, [(a, twins_a[0]), (b, twins_b[0])],
                                       "float32")
    assert not floor.ok  # the nudge predicts ~1e-10
    fair = criteria.final_reference_fallback(floor, a, b, ref, twins_a, twins_b)
    assert fair.ok and "float64" in fair.detail
    wrong = near(1e-5)  # one framework far from the exact run: not rounding
    floor = criteria.final_floor_check("w", wrong, b, [(b, twins_b[0])], "float32")
    assert not criteria.final_reference_fallback(floor, wrong, b, ref, [wrong], twins_b).ok
    passed = criteria.final_floor_check("w", a, a, [(a, a + 1e-7)], "float32")
    assert criteria.final_reference_fallback(passed, a, a, ref, [], []) is passed
