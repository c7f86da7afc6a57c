"""The evaluation metrics against uncertainty-toolbox, their oracle, and the reach bounds
the cross-framework comparison of metrics rests on."""

import math

import numpy as np
import pytest
import scoringrules

from hetcore import criteria, data, metrics
from hetcore.settings import Settings

uct = pytest.importorskip("uncertainty_toolbox")

# Targets: the scores to 1e-6 relative, the calibration-curve metrics to 1e-4 (they count
# points, so a point whose standardised residual sits on an interval's end could be
# counted by one and not the other; none is, and both are measured at ~1e-15).
SCORE_RTOL, CALIBRATION_ATOL = 1e-6, 1e-4


def toolbox(mu, sigma, y) -> dict:
    """uncertainty-toolbox's own functions, as get_all_metrics calls them (its defaults:
    100 bins, 99 levels, scaled), under this project's names."""
    return {
        "nll_full": uct.nll_gaussian(mu, sigma, y),
        "crps": uct.crps_gaussian(mu, sigma, y),
        "check_score": uct.check_score(mu, sigma, y),
        "interval_score": uct.interval_score(mu, sigma, y),
        "sharpness": uct.sharpness(sigma),
        "mace": uct.mean_absolute_calibration_error(mu, sigma, y),
        "rmsce": uct.root_mean_squared_calibration_error(mu, sigma, y),
        "miscalibration_area": uct.miscalibration_area(mu, sigma, y),
    }


def check_against_toolbox(y, mu, sigma) -> None:
    ours = metrics.final_metrics(y, mu, np.asarray(sigma, np.float64) ** 2, None)
    ref = toolbox(*(np.asarray(a, np.float64) for a in (mu, sigma, y)))
    for key in metrics.SCORE_KEYS:
        assert ours[key] == pytest.approx(ref[key], rel=SCORE_RTOL), key
    for key in metrics.CALIBRATION_KEYS:
        assert ours[key] == pytest.approx(ref[key], abs=CALIBRATION_ATOL), key


PREDICTIONS = [  # (name, n, how far the noise is from the predicted sigma)
    ("calibrated", 500, 1.0), ("too narrow", 731, 2.5), ("too wide", 300, 0.3),
    ("badly off", 200, 40.0), ("one point", 1, 1.0),
]


@pytest.mark.parametrize("name,n,scale", PREDICTIONS, ids=[p[0] for p in PREDICTIONS])
def test_every_metric_equals_uncertainty_toolbox(name, n, scale):
    rng = np.random.default_rng(n)
    mu = rng.normal(size=n)
    sigma = np.exp(0.4 * rng.normal(size=n))
    y = mu + scale * sigma * rng.normal(size=n)
    check_against_toolbox(y, mu, sigma)


def test_every_metric_equals_uncertainty_toolbox_on_a_trained_fit(tmp_path):
    """The project's own predictions: a short run's training and held-out predictions."""
    from hetapps import train

    out = tmp_path / "run"
    assert train.main(["--preset", "none", "--seed", "4", "--width", "16", "--epochs", "150",
                       "--no-progress", "--device", "cpu", "--out", str(out)]) == 0
    import json

    m = json.loads((out / "metrics.json").read_text())
    for block, name in (("final", "predictions.csv"), ("test", "test_predictions.csv")):
        p = np.genfromtxt(out / name, delimiter=",", names=True)
        y = p["y"] if "y" in p.dtype.names else data.synthetic(500, 4).y
        ref = toolbox(p["mu"], p["sigma"], y)
        for key, value in ref.items():
            tol = dict(rel=SCORE_RTOL) if key in metrics.SCORE_KEYS else dict(
                abs=CALIBRATION_ATOL)
            assert m[block][key] == pytest.approx(value, **tol), (block, key)


def test_log_score_stays_exact_where_the_library_underflows():
    """scoringrules' logs_normal agrees with the written-out log score where the density is
    representable, and is inf beyond |z| ~ 38, where ours stays the closed form's value."""
    y, mu, sigma = np.array([0.3, 2.0, 50.0]), np.zeros(3), np.ones(3)
    ours = [metrics.gaussian_scores(y[i:i + 1], mu[i:i + 1], sigma[i:i + 1])["nll_full"]
            for i in range(3)]
    with np.errstate(divide="ignore"):
        lib = scoringrules.logs_normal(y, mu, sigma, backend="numpy")
    np.testing.assert_allclose(ours[:2], lib[:2], rtol=1e-13)
    assert np.isinf(lib[2])
    assert ours[2] == pytest.approx(0.5 * math.log(2 * math.pi) + 0.5 * 50.0 ** 2, rel=1e-15)


def test_calibration_curve_counts_interval_ends_as_inside():
    """A residual exactly on an interval's end counts as inside (uncertainty-toolbox's
    `lower <= z <= upper`): at p = 0 only z == 0 is inside."""
    y = np.array([0.0, 1.0, -1.0, 2.0])
    obs = metrics.calibration_curve(y, np.zeros(4), np.ones(4))
    assert obs[0] == 0.25 and obs[-1] == 1.0
    assert np.all(np.diff(obs) >= 0)


def test_area_between_traces_crossings():
    x = np.array([0.0, 1.0, 2.0])
    assert metrics.area_between(x, np.array([1.0, -1.0, -1.0])) == pytest.approx(0.5 + 1.0)
    assert metrics.area_between(x, np.array([0.0, 2.0, 0.0])) == pytest.approx(2.0)


def test_held_out_draw_is_a_fresh_draw_of_the_same_law():
    s = Settings(preset="none", seed=7)
    train = data.for_settings(s)
    held = data.held_out(s, train)
    np.testing.assert_array_equal(held.x, train.x)
    assert not np.array_equal(held.y, train.y)
    rng = np.random.default_rng(np.random.SeedSequence(7).spawn(1)[0])  # the documented law
    expected = np.sin(train.x) + rng.standard_normal(500) * (0.1 * (3 - np.abs(train.x)))
    np.testing.assert_array_equal(held.y, expected)
    # not any seed's training draw nor an epoch's batch order stream
    for other in range(20):
        assert not np.array_equal(held.y, data.synthetic(500, other).y)
    lecture = data.held_out(Settings(), data.for_settings(Settings()))
    np.testing.assert_array_equal(lecture.y, data.synthetic(500, 0, held_out=True).y)
    two = data.held_out(Settings(preset="two-sines", seed=3),
                        data.for_settings(Settings(preset="two-sines", seed=3)))
    assert two.law == "two-sines" and np.allclose(np.abs(two.y), np.abs(np.sin(two.x)))
    assert data.held_out(Settings(data="x.csv"), data.Dataset(np.zeros(2), np.zeros(2), "f",
                                                              False)) is None


def _perturbed(rng, n, eps):
    mu = rng.normal(size=n)
    sigma = np.exp(0.3 * rng.normal(size=n))
    y = mu + sigma * rng.normal(size=n)
    d_mu, d_sigma = eps * rng.uniform(0, 1, n), eps * rng.uniform(0, 1, n)
    mu2 = mu + d_mu * rng.choice([-1, 1], n)
    sigma2 = sigma + d_sigma * rng.choice([-1, 1], n)
    return y, mu, sigma, mu2, sigma2


def test_metric_reach_bounds_every_metric_and_counting_bounds_are_attained():
    """For predictions moved within (d_mu, d_sigma) of the first, every metric moves by no
    more than metric_reach says; the counted metrics' bounds are reached (a point that
    crosses an interval's end moves the curve by exactly its count)."""
    rng = np.random.default_rng(0)
    worst = {}
    for trial in range(120):
        y, mu, sigma, mu2, sigma2 = _perturbed(rng, 300, 10.0 ** rng.uniform(-7, -1))
        a = metrics.final_metrics(y, mu, sigma ** 2, None)
        b = metrics.final_metrics(y, mu2, sigma2 ** 2, None)
        reach = criteria.metric_reach(y, mu, sigma, np.abs(mu2 - mu), np.abs(sigma2 - sigma))
        for key in a:
            gap = abs(a[key] - b[key])
            assert gap <= reach[key] * (1 + 1e-9) + 1e-15, (trial, key, gap, reach[key])
            worst[key] = max(worst.get(key, 0.0), gap / reach[key] if reach[key] else 0.0)
    for key in ("mace", "coverage_1sigma", "miscalibration_area"):
        assert worst[key] > 0.99, key
    for key in ("crps", "nll_full", "check_score", "interval_score", "sharpness"):
        assert worst[key] > 1e-3, key  # the bounds are not vacuous: gaps come near


def test_metric_checks_fail_when_a_metric_moves_beyond_its_reach():
    rng = np.random.default_rng(1)
    y, mu, sigma, _, _ = _perturbed(rng, 200, 0.0)
    ma = metrics.final_metrics(y, mu, sigma ** 2, None)
    mb = dict(ma, crps=ma["crps"] + 1e-3)
    checks = criteria.metric_checks("test", ma, mb, y, (mu, sigma), (mu, sigma), 1e-7, 1e-7,
                                    "float32", "a test")
    bad = [c.quantity for c in checks if not c.ok]
    assert bad == ["crps (held-out data)"]


def test_mixture_moments():
    mu = np.array([[0.0, 1.0], [2.0, 1.0]])
    var = np.array([[1.0, 4.0], [3.0, 4.0]])
    m, v = metrics.mixture(mu, var)
    np.testing.assert_array_equal(m, [1.0, 1.0])
    np.testing.assert_array_equal(v, [2.0 + 1.0, 4.0])  # mean variance + spread of means


def test_a_point_crossing_an_interval_end_moves_a_counted_metric_by_its_reach():
    """A counted metric that moves by exactly its reach (one point across the 2-sigma
    line) passes: the bound carries the rounding of computing it."""
    rng = np.random.default_rng(2)
    passed = 0
    for _ in range(50):
        y = rng.normal(size=500)
        mu, sigma = np.zeros(500), np.ones(500)
        y[0] = 2.0 + 1e-9
        mu2 = mu.copy()
        mu2[0] = 2e-8  # moves point 0 inside the 2-sigma interval
        a, b = (metrics.final_metrics(y, m, sigma ** 2, None) for m in (mu, mu2))
        assert a["coverage_2sigma"] != b["coverage_2sigma"]
        checks = criteria.metric_checks("final", a, b, y, (mu, sigma), (mu2, sigma),
                                        np.abs(mu2 - mu), 0.0, "float64", "a test")
        passed += not criteria.failures(checks)
    assert passed == 50
