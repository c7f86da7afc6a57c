"""The suite catches a broken JAX side: each test breaks jaxhet on purpose (monkeypatched,
undone after the test) and asserts that the parity checks fail, naming what differs.

Breakages: a swapped transpose of a square kernel (the only kind a shape check cannot
see), the softplus without its epsilon, and a learning rate off by 1e-4 relative.
"""

import jax
import optax
import pytest

import jaxhet.engine
import jaxhet.model
import jaxhet.weights
from hetapps import parity as parity_command
from hetcore import criteria
from parity_support import (dataset, evaluate, floor_gaps, init_state, settings,
                            single_step_checks, train_pair)


@pytest.fixture
def fresh_jax(monkeypatch):
    """Compiled programs bake constants in: start and end the test with empty caches."""
    jax.clear_caches()
    monkeypatch.setattr(jaxhet.engine, "_compiled", {})
    yield
    jax.clear_caches()
    jaxhet.engine._compiled.clear()


@pytest.fixture
def swapped_transpose(monkeypatch, fresh_jax):
    real = jaxhet.weights.from_state_dict

    def broken(state, abstract):
        state = {n: (a.T if n.endswith(".weight") and a.shape[0] == a.shape[-1] else a)
                 for n, a in state.items()}
        return real(state, abstract)

    monkeypatch.setattr(jaxhet.weights, "from_state_dict", broken)


@pytest.fixture
def no_eps(monkeypatch, fresh_jax):
    monkeypatch.setattr(jaxhet.model, "EPS", 0.0)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_swapped_transpose_fails(swapped_transpose, device, dtype):
    w = init_state("torch", 6, 2, dtype, seed=2)
    x, y = dataset(40, dtype, seed=2)
    checks = single_step_checks(evaluate("jax-jit", w, x, y, device),
                                evaluate("torch-eager", w, x, y, device), dtype)
    failed = {c.quantity for c in criteria.failures(checks)}
    assert {"mu", "var", "grad layers.2.weight"} <= failed, failed


def test_softplus_without_eps_fails_in_float64(no_eps, device):
    """float64: var differs by exactly 1e-6, 10^6 times the bound. (In float32 a 1e-6
    change of a variance near 1 is 8 ulps, within any sound float32 bound: the float64
    checks are the ones that see it.)"""
    w = init_state("flax", 6, 2, "float64", seed=2)
    x, y = dataset(40, "float64", seed=2)
    checks = single_step_checks(evaluate("jax-jit", w, x, y, device),
                                evaluate("torch-eager", w, x, y, device), "float64")
    failed = {c.quantity: c for c in criteria.failures(checks)}
    assert "var" in failed and abs(failed["var"].max_abs - 1e-6) < 1e-9, failed


def test_small_trajectory_bug_fails_the_float32_floor(monkeypatch, fresh_jax, device):
    """A learning rate 1e-4 off, in float32: single steps agree within 1e-5, but the
    trajectory leaves the one-ulp floor."""
    real = optax.sgd
    monkeypatch.setattr(optax, "sgd", lambda lr, *a, **k: real(lr * (1 + 1e-4), *a, **k))
    w = init_state("torch", 16, 2, "float32", seed=1)
    x, y = dataset(64, "float32", seed=1)
    pair = train_pair(settings(16, 2, "float32", epochs=40, lr=2e-2, device=device), x, y, w,
                      twins=1, loops=("scan", "eager"))
    step = criteria.check_close("loss", pair["jax"].loss_history[:2],
                                pair["torch"].loss_history[:2], criteria.SINGLE_STEP["float32"],
                                "float32")
    assert step.ok  # the bug is invisible in one step
    check, _ = criteria.floor_check("loss per epoch", pair["jax"].loss_history,
                                    pair["torch"].loss_history, floor_gaps(pair), "float32")
    assert not check.ok, check.message()


def test_parity_command_exits_1_on_a_broken_side(no_eps, tmp_path, capsys):
    out = tmp_path / "report"
    rc = parity_command.main(["--preset", "none", "--seed", "1", "--width", "6", "--depth",
                              "1", "--n-points", "20", "--epochs", "5", "--lr", "0.01",
                              "--dtype", "float64", "--floor-runs", "1", "--device", "cpu",
                              "--grid-points", "50", "--out", str(out), "--quiet"])
    text = capsys.readouterr().out
    assert rc == 1
    assert "FAIL var [float64]" in text, text
    assert (out / "parity.json").is_file()  # the report of a failed check is written
