"""The recipe sweep's own parts: its seed list, and the fixed-bandwidth kernel candidates
checked against the smoother's law written out here."""

import json
import os

import numpy as np
import pytest

from hetapps.recipe_sweep import main, parse_seeds
from hetcore import data, metrics
from hetcore.errors import UsageError


def test_seeds_take_lists_and_inclusive_ranges():
    assert parse_seeds("0-2,5, 7-7") == [0, 1, 2, 5, 7]


@pytest.mark.parametrize("text, needle", [("", "names no seed"), ("3-1", "is empty"),
                                          ("a", "expected"), ("1-b", "expected"),
                                          ("0-100000", "more than")])
def test_bad_seed_lists_are_refused(text, needle):
    with pytest.raises(UsageError, match=needle):
        parse_seeds(text)


@pytest.mark.parametrize("argv, needle", [
    (["--candidates", "kernel-0"], "--candidates kernel-0"),
    (["--candidates", "kernel-nan"], "--candidates kernel-nan"),
    (["--candidates", "fastest"], "--candidates fastest: unknown"),
    (["--seeds", "4-2"], "--seeds"),
])
def test_bad_sweeps_are_refused_before_anything_is_written(tmp_path, capsys, argv, needle):
    out = tmp_path / "sweep"
    assert main(["--candidates", "kernel-0.3", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not out.exists()


def test_a_kernel_candidate_is_the_smoother_at_its_bandwidth(tmp_path):
    # The smoother written out from its law, apart from hetcore.metrics.oracle_sigma:
    # sigma(x_j)^2 = sum_i K(x_j - x_i) r_i^2 / sum_i K(x_j - x_i), r_i = y_i - sin(x_i).
    out = tmp_path / "sweep"
    assert main(["--candidates", "kernel-0.3,kernel-0.15", "--seeds", "3,4",
                 "--out", str(out)]) == 0
    results = json.loads((out / "sweep.json").read_text())
    assert (out / "sweep.md").read_text().count("| kernel-") == 2
    for name, h in (("kernel-0.3", 0.3), ("kernel-0.15", 0.15)):
        for run in results[name]["runs"]:
            ds = data.synthetic(500, run["seed"])
            r2 = (ds.y - np.sin(ds.x)) ** 2
            sigma = np.array([np.sqrt(np.sum(np.exp(-0.5 * ((xj - ds.x) / h) ** 2) * r2)
                                      / np.sum(np.exp(-0.5 * ((xj - ds.x) / h) ** 2)))
                              for xj in ds.x])
            true_sigma = 0.1 * (3 - np.abs(ds.x))
            mae = np.mean(np.abs(sigma - true_sigma))
            assert run["sigma_mae"] == pytest.approx(mae, rel=1e-12)
            assert run["coverage_2sigma"] == np.mean(np.sqrt(r2) <= 2 * sigma)
            assert run["mean_rmse"] == 0.0
            # the oracle picks the best of its bandwidths, these among them: never better
            assert run["ratio"] >= 1 - 1e-12
            if run["oracle_bandwidth"] == h:
                assert run["ratio"] == pytest.approx(1.0, rel=1e-12)


def test_the_truth_candidate_is_the_law_itself(tmp_path):
    out = tmp_path / "sweep"
    assert main(["--candidates", "truth", "--seeds", "5", "--out", str(out)]) == 0
    (run,) = json.loads((out / "sweep.json").read_text())["truth"]["runs"]
    ds = data.synthetic(500, 5)
    sigma = np.sqrt((0.1 * (3 - np.abs(ds.x))) ** 2 + 1e-6)
    assert run["coverage_2sigma"] == np.mean(np.abs(ds.y - np.sin(ds.x)) <= 2 * sigma)
    assert run["sigma_mae"] < 1e-4 and run["mean_rmse"] == 0.0
    assert np.isfinite(run["test_crps"])
