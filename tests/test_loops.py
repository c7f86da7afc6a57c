"""Every training loop trains the same run: same losses from the same initial weights,
warm-up that does not advance the weights, rematerialisation that changes memory only."""

import jax
import numpy as np
import pytest
import torch

import jaxhet.backend as jb
import jaxhet.measure as jmeasure
import torchhet.backend as tb
import torchhet.engine as tengine
import torchhet.measure as tmeasure
import torchhet.weights as tweights
from hetcore import driver
from hetcore.backend import EngineOptions
from hetcore.errors import UsageError
from hetcore.settings import LOOPS, Settings

CUDA = torch.cuda.is_available()
TORCH_LOOPS = [pytest.param(loop, marks=[pytest.mark.gpu] if loop in tengine.CUDA_ONLY else [])
               for loop in LOOPS["torch"]]


def assert_same_run(r, ref):
    """float64 runs that differ in rounding only: losses and final weights to ~1e-12."""
    np.testing.assert_allclose(r.loss_history, ref.loss_history, rtol=1e-12, atol=1e-13)
    for n in ref.weights:
        np.testing.assert_allclose(r.weights[n], ref.weights[n], rtol=1e-11, atol=1e-13,
                                   err_msg=n)


@pytest.fixture(scope="module")
def problem():
    """A small float64 problem (float64: loops that differ only in rounding agree to ~1e-15,
    while a skipped, doubled or shifted epoch is off by far more)."""
    from hetcore.data import synthetic
    from hetcore.interchange import shapes

    rng = np.random.default_rng(3)
    state = {n: (rng.standard_normal(s) * 0.5).astype("float64")
             for n, s in shapes(12, 2).items()}
    x, y = synthetic(40, 5).columns("float64")
    s = Settings(framework="torch", device="gpu" if CUDA else "cpu", preset="none", epochs=19,
                 lr=0.05, width=12, dtype="float64", chunk_epochs=6)
    return state, x, y, s


@pytest.fixture(scope="module")
def eager_run(problem):
    state, x, y, s = problem
    return driver.train(tb, s.replace(loop="eager"), x, y, state)


@pytest.mark.parametrize("loop", TORCH_LOOPS)
def test_every_torch_loop_trains_the_eager_run(loop, problem, eager_run):
    # compile and the CUDA loops warm up (compile, capture) on the run's own weights and
    # must put them back: epoch 0's loss is the initial weights' loss.
    state, x, y, s = problem
    r = driver.train(tb, s.replace(loop=loop), x, y, state)
    assert r.loop == loop
    assert_same_run(r, eager_run)


@pytest.mark.skipif(CUDA, reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("loop", tengine.CUDA_ONLY)
def test_cuda_loops_refuse_a_cpu_device(loop, problem):
    state, x, y, s = problem
    with pytest.raises(UsageError) as info:
        driver.train(tb, s.replace(loop=loop, device="cpu"), x, y, state)
    msg = str(info.value)
    assert "CUDA" in msg and loop in msg and "\n" not in msg


@pytest.mark.parametrize("depth,full", [(1, True), (3, False)])
def test_no_autograd_backward_is_autograds(depth, full, small_state, small_data):
    # The hand-written backward against autograd's, at depths where the loop's first and
    # inner layers differ from the lecture's two, with and without the loss's constant.
    state = small_state(width=10, depth=depth, dtype="float64")
    x, y = small_data(n=30, dtype="float64")
    s = Settings(framework="torch", device="cpu", preset="none", epochs=9, lr=0.05, width=10,
                 depth=depth, dtype="float64", chunk_epochs=4, full=full)
    assert_same_run(driver.train(tb, s.replace(loop="no-autograd"), x, y, state),
                    driver.train(tb, s.replace(loop="eager"), x, y, state))


def test_no_autograd_diverges_where_eager_does(small_state, small_data):
    # Too large a step: both loops stop at the same epoch, the chunk replayed by the driver
    # (the loop must see the weights the driver put back between its calls).
    from hetcore.errors import TrainingDiverged

    state = small_state(width=8, depth=2)
    x, y = small_data(n=30)
    s = Settings(framework="torch", device="cpu", preset="none", epochs=40, lr=1e6, width=8,
                 chunk_epochs=6)
    epochs = []
    for loop in ("eager", "no-autograd"):
        with pytest.raises(TrainingDiverged) as info:
            driver.train(tb, s.replace(loop=loop), x, y, state)
        epochs.append(info.value.epoch)
    assert epochs[0] == epochs[1] and 0 < epochs[0] < 40


def test_no_autograd_refuses_remat_and_counts_its_buffers(problem):
    state, x, y, s = problem
    with pytest.raises(UsageError) as info:
        driver.train(tb, s.replace(loop="no-autograd", remat=True), x, y, state)
    assert "--remat" in str(info.value) and "\n" not in str(info.value)
    s = s.replace(device="cpu")
    own = tmeasure.activation_bytes(s.replace(loop="no-autograd"), x, y, state)
    assert own == 2 * 40 * 12 * 8  # depth 2, N 40, width 12, float64
    assert own < tmeasure.activation_bytes(s.replace(loop="eager"), x, y, state)  # autograd
    # keeps more
    model = tweights.put(state, "float64", torch.device("cpu"))
    model.layers.append(torch.nn.Tanh())  # not the network it writes the backward for
    with pytest.raises(ValueError, match="Linear, ReLU"):
        tengine.make_runner("no-autograd", model, torch.tensor(x), torch.tensor(y),
                            s.replace(loop="no-autograd"))


def test_no_autograd_buffers_go_before_the_final_forward(problem, monkeypatch):
    # The loop's depth + 1 (N, width) blocks must not be alive while train() runs its final
    # forward pass (which allocates its own): that sum, not the loop, would be the peak.
    import weakref

    state, x, y, s = problem
    runs, alive = [], []
    real_runner, real_nll = tengine.handgrad.make_runner, tengine.training_loss

    def make_runner(*args):
        run = real_runner(*args)
        runs.append(weakref.ref(run))
        return run

    def nll(*args):  # train() calls it once, after the final forward pass
        alive.append(runs[0]() is not None)
        return real_nll(*args)

    monkeypatch.setattr(tengine.handgrad, "make_runner", make_runner)
    monkeypatch.setattr(tengine, "training_loss", nll)
    driver.train(tb, s.replace(loop="no-autograd"), x, y, state)
    assert alive == [False]


def test_jax_variants_train_the_same_run(problem):
    # scan and step, unrolled and rematerialised: the numpy-free reference is scan itself.
    state, x, y, s = problem
    s = s.replace(framework="jax", device="cpu")
    ref = driver.train(jb, s.replace(loop="scan"), x, y, state)
    eager = driver.train(tb, problem[3].replace(loop="eager", device="cpu"), x, y, state)
    np.testing.assert_allclose(ref.loss_history, eager.loss_history, rtol=1e-12, atol=1e-13)
    for loop, remat, unroll in [("step", False, 1), ("scan", True, 4)]:
        r = driver.train(jb, s.replace(loop=loop, remat=remat), x, y, state,
                         options=EngineOptions(unroll=unroll))
        np.testing.assert_allclose(r.loss_history, ref.loss_history, rtol=1e-12, atol=1e-13,
                                   err_msg=f"{loop} remat={remat} unroll={unroll}")
        assert r.final_loss == pytest.approx(ref.final_loss, rel=1e-12)


def test_jax_cpu_programs_train_the_first_pair_and_it_changes_only_rounding(problem,
                                                                             monkeypatch):
    # On a CPU every JAX program trains the first two layers as model.first_pair (w2's
    # gradient as a canonical product), but for remat, whose segments must stay whole, and
    # a one-layer trunk; a mini-batch run with Adam trains as the unpaired program does.
    import jaxhet.engine as je

    state, x, y, s = problem
    s = s.replace(framework="jax", device="cpu", batch_size=16, optimizer="adam", lr=0.01)
    dev = jax.devices("cpu")[0]
    assert je.paired_layers(2, False, dev) and je.paired_layers(3, False, dev)
    assert not je.paired_layers(2, True, dev)
    assert not je.paired_layers(1, False, dev)
    seen = []
    real = je.paired_layers
    monkeypatch.setattr(je, "paired_layers", lambda *a: seen.append(real(*a)) or seen[-1])
    paired = driver.train(jb, s, x, y, state)
    assert seen and all(seen)
    monkeypatch.setattr(je, "paired_layers", lambda *a: False)
    plain = driver.train(jb, s, x, y, state)
    assert_same_run(paired, plain)


@pytest.mark.parametrize("framework,loop", [("torch", "optim"), ("jax", "scan")])
def test_benchmark_trials_repeat_the_train_commands_run(problem, framework, loop):
    # A benchmark repeat is the train command's own run, from the initial weights each
    # time: identical histories, and the same as train() gives.
    from hetapps.bench.variants import Framework, trial

    state, x, y, s = problem
    s = s.replace(framework=framework, device="cpu", loop=loop, epochs=13, chunk_epochs=5)
    fw = Framework.load(framework, "cpu")
    _, repeat = trial(fw, loop)(state, x, y, s)
    a, b = repeat(), repeat()
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[1], driver.train(fw.backend, s, x, y, state).loss_history)
    assert a[0] > 0 and a[2] == b[2]


def test_torch_remat_changes_nothing_but_memory(problem, eager_run):
    state, x, y, s = problem
    r = driver.train(tb, s.replace(loop="eager", remat=True), x, y, state)
    np.testing.assert_allclose(r.loss_history, eager_run.loss_history, rtol=1e-13, atol=1e-14)


def test_remat_keeps_fewer_activations(small_state, small_data):
    state = small_state(width=64, depth=3)
    x, y = small_data(n=200)
    s = Settings(device="cpu", preset="none", width=64, depth=3, n_points=200)
    plain = jmeasure.activation_bytes(s, x, y, state)
    remat = jmeasure.activation_bytes(s.replace(remat=True), x, y, state)
    assert 0 < remat < plain
    s = s.replace(framework="torch", loop="eager")
    t_plain = tmeasure.activation_bytes(s, x, y, state)
    t_remat = tmeasure.activation_bytes(s.replace(remat=True), x, y, state)
    # depth 3: plain keeps every block's output; remat keeps only block inputs
    assert 0 < t_remat < t_plain
    # each (N, width) float32 activation is 200*64*4 bytes: at least the trunk's outputs
    assert t_plain >= 3 * 200 * 64 * 4


def test_defaults_are_loops_of_their_framework(small_state, small_data):
    import jaxhet.engine

    assert jaxhet.engine.DEFAULT_LOOP in LOOPS["jax"]
    lecture = Settings(framework="torch")
    for device_type in ("cpu", "cuda"):
        assert tengine.default_loop(device_type, lecture, 500) in LOOPS["torch"]
    assert tengine.default_loop("cpu", lecture, 500) not in tengine.CUDA_ONLY
    assert tengine.default_loop("cpu", lecture, 500) == "no-autograd"  # the fastest epoch
    # no-autograd has no remat and writes out the lecture's epoch alone
    assert tengine.default_loop("cpu", lecture.replace(remat=True), 500) == "eager"
    assert tengine.default_loop("cpu", lecture.replace(batch_size=100), 500) == "eager"
    assert tengine.default_loop("cpu", lecture.replace(batch_size=500), 500) == "no-autograd"
    assert tengine.default_loop("cpu", lecture.replace(optimizer="adam"), 500) == "optim"
    # a run long enough to repay compile-update's compiling takes it, on a CPU
    long = lecture.replace(optimizer="adam", batch_size=250,
                           epochs=-(-tengine.COMPILE_UPDATE_FROM // 80))
    assert tengine.default_loop("cpu", long, 20_000) == "compile-update"
    assert tengine.default_loop("cpu", long.replace(epochs=long.epochs - 1), 20_000) == "optim"
    assert tengine.default_loop("cpu", long.replace(remat=True), 20_000) == "optim"
    assert tengine.default_loop("cuda", long, 20_000) == "optim"
    assert tengine.default_loop("cuda", lecture, 500) == "cudagraph"
    assert tengine.default_loop("cuda", lecture.replace(momentum=0.5), 500) == "optim"
    # what a run with --loop auto records
    state, (x, y) = small_state(width=4, depth=1), small_data(n=10)
    s = Settings(device="cpu", preset="none", width=4, depth=1, epochs=2)
    assert driver.train(jb, s, x, y, state).loop == jaxhet.engine.DEFAULT_LOOP
    assert driver.train(tb, s.replace(framework="torch"), x, y, state).loop == "no-autograd"


def test_reference_timers_time_something():
    for measure in (jmeasure, tmeasure):
        for times in (measure.matmul_seconds(64, "float32", "cpu", 3),
                      measure.floor_seconds(50, 16, 2, "float32", "cpu", 3)):
            assert len(times) == 3 and all(t > 0 for t in times)


def test_xla_counts_the_lecture_epoch_flops():
    # The lecture epoch's matrix products are about 790.5 MFLOP; XLA adds
    # the element-wise work on top.
    from hetapps.bench.references import matmul_flops
    from hetcore import data, interchange

    x, y = data.lecture().columns("float32")
    flops = jmeasure.epoch_flops(Settings(device="cpu"), x, y, interchange.lecture_weights())
    assert matmul_flops(500, 512, 2) == 790_528_000
    assert 790.5e6 <= flops <= 1.02 * 790.5e6


def test_torch_trains_with_subnormals_flushed_as_xla_computes(small_state, small_data,
                                                               monkeypatch):
    # XLA's CPU code flushes subnormal results to zero; torch's loops run so too (a dead
    # unit's Adam moment decays into subnormals, which x86 computes on slowly), and the
    # process's own mode comes back after the run.
    import jax
    import jax.numpy as jnp

    from torchhet.device import arithmetic, flushing_subnormals

    tiny = np.float32(1e-39)
    product = jax.jit(lambda a, b: a * b)  # arguments: nothing for XLA to simplify away
    assert np.asarray(product(jnp.float32(tiny), jnp.float32(1.0))) == 0  # XLA's premise
    seen, real = [], tengine.make_runner

    def make_runner(*args, **kwargs):
        runner = real(*args, **kwargs)
        inner = runner.run

        def recorded(n, losses, start):
            seen.append(flushing_subnormals())
            inner(n, losses, start)

        runner.run = recorded
        return runner

    monkeypatch.setattr(tengine, "make_runner", make_runner)
    torch.set_flush_denormal(False)
    assert not flushing_subnormals() and torch.tensor(tiny).mul(1.0).item() == tiny
    s = Settings(framework="torch", device="cpu", preset="none", width=4, depth=1, epochs=4,
                 chunk_epochs=2)
    driver.train(tb, s, *small_data(n=10), small_state(width=4, depth=1))
    assert seen == [True, True] and not flushing_subnormals()
    # a mode the process had on stays on; an error inside the scope restores it too
    torch.set_flush_denormal(True)
    with pytest.raises(RuntimeError):
        with arithmetic():
            raise RuntimeError("inside")
    assert flushing_subnormals()
    torch.set_flush_denormal(False)


def test_the_flush_is_the_calling_threads_and_leaves_none_behind():
    # In a fresh process whose intra-op threads start inside the scope: the calling thread
    # flushes there, and after the scope a parallel loop over subnormals (threads of the
    # pool included) keeps every one of them: no thread was left flushing.
    import subprocess
    import sys

    from tests.conftest import ROOT

    code = (
        "import torch; torch.set_num_threads(2)\n"
        "from torchhet.device import arithmetic, flushing_subnormals\n"
        "with arithmetic():\n"
        "    inside = flushing_subnormals()\n"
        "    torch.zeros(1 << 20).add_(1.0)\n"
        "x = torch.full((1 << 20,), 1e-39)\n"
        "print(inside, int((x * 1.0 != 0).sum()), 1 << 20)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, env={**__import__("os").environ, "PYTHONPATH": ROOT},
                         check=True).stdout.split()
    assert out[0] == "True" and out[1] == out[2], out


@pytest.mark.slow
def test_compile_update_checks_in_full_a_call_warm_up_did_not_compile(problem, monkeypatch):
    # compile-update evaluates only the guards that tell its graphs apart on calls that
    # warm-up compiled (torchhet/whole.py). Warm-up here compiles one graph, four updates;
    # single updates (a replay's) then must be checked in full and compiled: four of them
    # from the same weights equal one call of four to rounding. (Under the cut guards torch
    # refuses to compile, and without a compile the four-update graph could have run.)
    from torchhet import whole
    from torchhet.model import HeteroscedasticMLP

    monkeypatch.setattr(whole, "CALL_BATCHES", 4)
    state, x, y, s = problem
    s = s.replace(device="cpu", optimizer="adam", lr=0.01, batch_size=10, shuffle_seed=1)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)

    def made():
        model = HeteroscedasticMLP(12, dtype=torch.float64)
        model.load_state_dict({n: torch.from_numpy(a) for n, a in state.items()})
        return model, whole.make(model, xs, ys, s, len(x))

    one_call, (_, _, _, _, batches) = made()
    assert whole.plan(4, False) == [4]  # the one graph warm-up compiles
    batches(xs, ys, 0)  # through the warmed graph, its guards skipped
    singles, (_, step, _, _, _) = made()
    for b in range(4):
        step(xs[10 * b:10 * b + 10], ys[10 * b:10 * b + 10], b)
    for (n, a), b in zip(one_call.named_parameters(), singles.parameters()):
        np.testing.assert_allclose(b.detach(), a.detach(), rtol=1e-12, atol=1e-14, err_msg=n)
        assert not torch.equal(a.detach(), torch.from_numpy(state[n])), n  # it trained


def test_narrow_float32_mini_batches_take_eigens_products_at_full_precision(small_state,
                                                                            small_data):
    """A float32 CPU program whose products have 250-1,000 rows at a width up to 128 is
    compiled with Eigen's products (jaxhet.engine.dot_options), other shapes and float64
    with XLA's default; the run keeps float32's full precision: its losses within a few
    float32 roundings of the same run in float64 (bf16 or TF32 products would be ~1e-3
    away)."""
    import jaxhet.engine as je
    from hetcore.interchange import cast

    cpu = jax.devices("cpu")[0]
    assert je.dot_options("float32", 128, 250, cpu) == je.EIGEN_DOTS
    assert je.dot_options("float32", 128, 1000, cpu) == je.EIGEN_DOTS
    for args in [("float32", 129, 250), ("float32", 64, 249), ("float32", 64, 1001),
                 ("float64", 64, 250)]:
        assert je.dot_options(*args, cpu) is None, args
    state = small_state(width=32, depth=2, dtype="float64")
    x, y = small_data(n=500, dtype="float64")
    x32, y32, w32 = x.astype("float32"), y.astype("float32"), cast(state, "float32")
    s = Settings(framework="jax", device="cpu", preset="none", width=32, n_points=500,
                 batch_size=250, optimizer="adam", lr=0.01, epochs=4, dtype="float32")
    assert "__ynn" not in je.JaxEngine(s, x32, y32, w32).compiled.as_text()
    r32 = driver.train(jb, s, x32, y32, w32)
    r64 = driver.train(jb, s.replace(dtype="float64"), x, y, state)
    np.testing.assert_allclose(r32.loss_history, r64.loss_history, rtol=2e-6)
