"""Bad input of every kind: exit 2, one line `error: ...` naming the input, no traceback,
and nothing in --out changed (issue: reliability)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st
from safetensors.numpy import save_file

from hetcore import checkpoint, data, interchange
from hetapps.train import main
from hetcore.errors import UsageError
from tests.conftest import ROOT

BASE = ["--preset", "none", "--width", "4", "--depth", "1", "--n-points", "12", "--epochs", "3",
        "--device", "cpu", "--no-progress"]

# option -> wrong values; each must be refused naming the option.
WRONG = {
    "--framework": ["mxnet", ""],
    "--device": ["quantum", "gpu", "tpu"],
    "--preset": ["lecture2"],
    "--epochs": ["0", "-3", "1.5", "ten", ""],
    "--lr": ["0", "-1e-3", "nan", "inf", "-inf", "fast", "1e39", "1e-50"],  # float32: inf, 0
    "--seed": ["-1", "4294967296", "x"],
    "--n-points": ["0", "-5", "1e3"],
    "--width": ["0", "-1", "w"],
    "--depth": ["0", "2.0", "101"],  # past MAX_DEPTH: compiling, not memory, would hang
    "--dtype": ["float16", "bfloat16", "int32"],
    "--chunk-epochs": ["0", "-2"],
    "--loop": ["fastest", "eager"],  # eager is a torch loop; the default framework is jax
    "--checkpoint-every": ["-1", "k"],
    "--recipe": ["fast", ""],
    "--loss": ["l1", "NLL"],
    "--optimizer": ["rmsprop"],
    "--schedule": ["linear"],
    "--momentum": ["-0.1", "1", "nan", "inf", "x"],
    "--warmup-steps": ["-1", "1.5", "100000"],  # the run has 3 updates
    "--batch-size": ["0", "-3", "x", "2.5"],
    "--shuffle-seed": ["-1", "x", str(2**64)],
}
# Options refused whatever their value when what they belong to is not given.
NOT_APPLICABLE = {
    "--beta": ["0.5", "-0.1", "nan"],  # needs --loss beta-nll
    "--weight-decay": ["1e-4", "-1", "nan"],  # needs --optimizer adamw
    "--lr-end": ["0", "-1"],  # needs --schedule cosine
}


@pytest.fixture
def existing_run(tmp_path):
    """An --out that already holds a finished run, to prove that nothing in it changes."""
    out = tmp_path / "out"
    assert main(BASE + ["--out", str(out)]) == 0
    return out


def snapshot(path):
    return {os.path.relpath(os.path.join(top, f), path): open(os.path.join(top, f), "rb").read()
            for top, _, files in os.walk(path) for f in files}


def assert_refused(capsys, argv, out, needle):
    before = snapshot(out)
    siblings = sorted(os.listdir(os.path.dirname(out)))
    try:
        code = main(argv + ["--out", str(out), "--overwrite"])
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, (argv, err)
    assert len(err) == 1, err
    assert "error: " in err[0] and needle in err[0], (needle, err)
    assert snapshot(out) == before
    assert sorted(os.listdir(os.path.dirname(out))) == siblings  # no staging left behind


@pytest.mark.parametrize("option,value", [(o, v) for o, vs in WRONG.items() for v in vs])
def test_every_option_refuses_wrong_values(capsys, existing_run, option, value):
    needle = option if option != "--device" or value == "quantum" else "available"
    assert_refused(capsys, BASE + [option, value], existing_run, needle)


@pytest.mark.parametrize("option,value", [(o, v) for o, vs in NOT_APPLICABLE.items()
                                          for v in vs])
def test_an_option_that_does_not_apply_is_refused(capsys, existing_run, option, value):
    assert_refused(capsys, BASE + [option, value], existing_run, option)


@pytest.mark.parametrize("argv,needle", [
    (["--beta", "2", "--loss", "beta-nll"], "--beta: must be in [0, 1]"),
    (["--weight-decay", "nan", "--optimizer", "adamw"], "--weight-decay"),
    (["--weight-decay", "50", "--optimizer", "adamw"], "--weight-decay"),
    (["--lr-end", "1", "--schedule", "cosine"], "--lr-end"),  # above --lr
    (["--lr-end", "nan", "--schedule", "cosine"], "--lr-end"),
    (["--optimizer", "adam", "--momentum", "0.9"], "only --optimizer sgd takes --momentum"),
    (["--optimizer", "adam", "--nesterov"], "only --optimizer sgd takes --nesterov"),
    (["--nesterov"], "needs --momentum above 0"),
    (["--loss", "mse", "--full"], "--full"),
    (["--recipe", "calibrated", "--warmup-steps", "100"],
     "--warmup-steps 100: longer than the run's 3 updates"),
    (["--epochs", "100000000000"], "--epochs: at most"),
    (["--loop", "no-autograd", "--framework", "torch", "--optimizer", "adam"],
     "--loop no-autograd"),
    (["--loop", "eager", "--framework", "torch", "--momentum", "0.5"], "--loop eager"),
])
def test_training_options_that_do_not_go_together(capsys, existing_run, argv, needle):
    assert_refused(capsys, BASE + argv, existing_run, needle)


def test_unknown_option_and_conflicts(capsys, existing_run):
    assert_refused(capsys, BASE + ["--colour", "red"], existing_run, "--colour")
    assert_refused(capsys, BASE + ["--framework", "torch", "--loop", "scan"], existing_run, "--loop")
    assert_refused(capsys, BASE + ["--width", "300000", "--depth", "2"], existing_run, "GiB")
    assert_refused(capsys, BASE + ["--n-points", "20000000000"], existing_run, "GiB")
    # no abbreviations: bench's --data would otherwise be taken for --data-parallel
    assert_refused(capsys, BASE + ["--epoch", "3"], existing_run, "--epoch")


def _refused(capsys, command, argv, needle):
    """command (a main) refuses argv: exit 2, one line naming `needle`."""
    try:
        code = command(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, (argv, err)
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err


def test_an_out_that_cannot_hold_a_run_is_refused_before_any_work(capsys, tmp_path):
    from hetapps.bench.command import main as bench
    from hetapps.parity import main as parity

    cwd = os.getcwd()
    os.chdir(tmp_path)  # an empty --out taken for the default would write runs/ here
    try:
        for command, argv in ((main, BASE), (parity, BASE[:-1]),
                              (bench, BASE[:-1] + ["--variants", "jax:scan"])):
            _refused(capsys, command, argv + ["--out", ""], "--out: empty")
            # permission bits would pass as root: the directory is really created and removed
            _refused(capsys, command, argv + ["--out", "/proc/het-nowhere/run"],
                     "--out /proc/het-nowhere/run: cannot create it")
        assert os.listdir(tmp_path) == []
    finally:
        os.chdir(cwd)
    afile = tmp_path / "afile"
    afile.write_text("mine")
    _refused(capsys, bench, BASE[:-1] + ["--out", str(afile)], "not a directory")
    assert afile.read_text() == "mine"


def test_absurd_sizes_are_refused_by_parity_and_bench_before_any_work(capsys, tmp_path):
    from hetapps.bench.command import main as bench
    from hetapps.parity import main as parity

    out = tmp_path / "out"
    for argv, needle in ((["--n-points", str(10**12)], "GiB"),
                         (["--width", str(10**7), "--depth", "2"], "GiB"),
                         (["--ensemble", "4096", "--width", "2048", "--depth", "2"], "GiB")):
        _refused(capsys, parity, BASE[:-1] + argv + ["--out", str(out)], needle)
        _refused(capsys, bench, BASE[:-1] + argv + ["--out", str(out)], needle)
    for argv, needle in ((["--floor-runs", str(10**9)], "--floor-runs"),
                         (["--grid-points", str(10**12)], "--grid-points"),
                         # a model that trains in little memory, whose band on the grid would
                         # not: the grid's predictions are one call
                         (["--width", str(10**7), "--grid-points", "1001"], "--grid-points")):
        _refused(capsys, parity, BASE[:-1] + argv + ["--out", str(out)], needle)
    for argv, needle in ((["--repeats", str(10**9)], "--repeats"),
                         (["--peak-size", str(10**7)], "--peak-size"),
                         (["--repeat-seconds", "inf"], "--repeat-seconds"),
                         (["--optimizer", "adam", "--warmup-steps", "100"], "--warmup-steps")):
        _refused(capsys, bench, BASE[:-1] + argv + ["--out", str(out)], needle)
    assert not out.exists()  # bench used to create --out before its checks


def test_overwrite_replaces_the_whole_run_and_never_an_input(capsys, tmp_path):
    from hetapps.evaluate import main as evaluate

    out = tmp_path / "out"
    assert main(BASE + ["--framework", "both", "--out", str(out)]) == 0
    (out / "notes.txt").write_text("mine")
    assert main(BASE + ["--out", str(out), "--overwrite"]) == 0
    left = set(os.listdir(out))
    # the earlier run's per-framework directories and comparison are gone; the user's file
    # and the new run stay
    assert not left & {"jax", "torch", "parity.json", "parity.png"}, left
    assert {"notes.txt", "metrics.json", "weights.safetensors"} <= left
    # a name some run writes (the loss comparison's nll/) is never replaced without
    # --overwrite, even in a directory that holds no run of this command
    mine = tmp_path / "mine"
    (mine / "nll").mkdir(parents=True)
    (mine / "nll" / "notes.txt").write_text("mine")
    _refused(capsys, main, BASE + ["--out", str(mine)], "already holds a run (nll)")
    assert (mine / "nll" / "notes.txt").read_text() == "mine"
    weights = (out / "weights.safetensors").read_bytes()
    _refused(capsys, evaluate, ["--weights", str(out / "weights.safetensors"), "--n-points",
                                "12", "--out", str(out), "--overwrite"],
             "would delete")
    assert (out / "weights.safetensors").read_bytes() == weights


def _write_csv(path, text):
    path.write_text(text)
    return path


def data_files(tmp):
    """(file, what the message must name) for every kind of broken data file."""
    good = np.linspace(0, 1, 5)
    cases = []

    def npz(name, **arrays):
        p = tmp / f"{name}.npz"
        np.savez(p, **arrays)
        return p

    cases += [
        (_write_csv(tmp / "empty.csv", ""), "empty"),
        (_write_csv(tmp / "header.csv", "a,b\n1,2\n"), "header"),
        (_write_csv(tmp / "extra.csv", "x,y,z\n1,2,3\n"), "header"),
        (_write_csv(tmp / "ragged.csv", "x,y\n1,2\n1,2,3\n"), "line 3"),
        (_write_csv(tmp / "nan.csv", "x,y\n1,nan\n"), "y[0]"),
        (_write_csv(tmp / "inf.csv", "x,y\n-inf,1\n"), "x[0]"),
        (_write_csv(tmp / "words.csv", "x,y\none,two\n"), "line 2"),
        (_write_csv(tmp / "underscore.csv", "x,y\n1,2\n1_000,2\n"), "line 3"),
        (_write_csv(tmp / "nodata.csv", "x,y\n"), "no data points"),
        (_write_csv(tmp / "big.csv", "x,y\n1,1e39\n"), "finite float32"),
        (npz("missing", x=good), "missing array 'y'"),
        (npz("names", a=good, b=good), "missing array 'x'"),
        (npz("extra", x=good, y=good, z=good), "unexpected arrays"),
        (npz("lengths", x=good, y=good[:3]), "5 points but y has 3"),
        (npz("shape", x=np.ones((5, 2)), y=good), "shape (5, 2)"),
        (npz("dtype", x=good.astype(complex), y=good), "complex"),
        (npz("nan", x=good, y=np.full(5, np.nan)), "y[0]"),
        (npz("empty_arrays", x=np.ones(0), y=np.ones(0)), "no data points"),
    ]
    trunc = tmp / "trunc.npz"
    trunc.write_bytes(npz("whole", x=good, y=good).read_bytes()[:50])
    cases.append((trunc, "not a readable .npz"))
    notzip = tmp / "notzip.npz"
    notzip.write_bytes(b"\x93NUMPY" + b"\x00" * 50)
    cases.append((notzip, "not a .npz"))
    huge = tmp / "huge.csv"
    with open(huge, "wb") as f:
        f.truncate(data.MAX_DATA_BYTES + 1)  # sparse: costs no disk
    cases.append((huge, "bytes is more than"))
    cases.append((tmp, "not a regular file"))
    cases.append((tmp / "absent.csv", "no such file"))
    return cases


@pytest.mark.parametrize("option", ["--data", "--init-from"])
def test_every_broken_input_file_is_refused(capsys, existing_run, tmp_path, option):
    # Each message names the problem and the file.
    files = tmp_path / "files"
    files.mkdir()
    for path, needle in (data_files if option == "--data" else weight_files)(files):
        assert_refused(capsys, BASE + [option, str(path)], existing_run, needle)
        assert_refused(capsys, BASE + [option, str(path)], existing_run, str(path))


def weight_files(tmp):
    good = {n: np.zeros(s, np.float32) for n, s in interchange.shapes(4, 1).items()}
    cases = []

    def st_file(name, tensors):
        p = tmp / f"{name}.safetensors"
        interchange.write(str(p), tensors)
        return p

    cases += [
        (st_file("missing", {n: a for n, a in good.items() if n != "var_head.bias"}),
         "missing tensor 'var_head.bias'"),
        (st_file("renamed", {**{n: a for n, a in good.items() if n != "mean_head.bias"},
                             "mean.bias": np.zeros(1, np.float32)}), "'mean_head.bias'"),
        (st_file("extra", {**good, "layers.2.weight": np.zeros((4, 4), np.float32)}),
         "unexpected tensor 'layers.2.weight'"),
        (st_file("shape", {**good, "layers.0.weight": np.zeros((5, 1), np.float32)}),
         "'layers.0.weight' has shape (5, 1)"),
        (st_file("dtype", {**good, "mean_head.weight": np.zeros((1, 4))}),
         "'mean_head.weight' is float64"),
        (st_file("nan", {**good, "layers.0.bias": np.full(4, np.nan, np.float32)}),
         "'layers.0.bias' holds non-finite"),
        (st_file("inf", {**good, "var_head.weight": np.full((1, 4), np.inf, np.float32)}),
         "'var_head.weight' holds non-finite"),
        (st_file("huge", {**good, "padding": np.zeros(1 << 19, np.float32)}), "bytes is more"),
    ]
    # good tensors under metadata that evaluate refuses: refused for training too
    for name, meta in [("meta-json", "{not json"), ("meta-list", "[1, 2]"),
                       ("meta-deep", "[" * 200_000)]:
        p = tmp / f"{name}.safetensors"
        save_file(good, str(p), metadata={interchange.METADATA_KEY: meta})
        cases.append((p, f"metadata '{interchange.METADATA_KEY}' is not"))
    # bfloat16, which numpy cannot hold: refused as a dtype, not as a broken file
    header = json.dumps({"layers.0.weight": {"dtype": "BF16", "shape": [4, 1],
                                             "data_offsets": [0, 8]}}).encode()
    bf16 = tmp / "bf16.safetensors"
    bf16.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    cases.append((bf16, "'layers.0.weight' is bfloat16"))
    whole = st_file("whole", good).read_bytes()
    for name, content in [("empty", b""), ("trunc", whole[:-7]), ("garbage", b"\xff" * 64)]:
        p = tmp / f"{name}.safetensors"
        p.write_bytes(content)
        cases.append((p, "not a valid safetensors"))
    # cut inside its header: said so, whatever the header's length looks like (one of 128 +
    # 256k bytes opens with 0x80, as a pickle does)
    p = tmp / "header.safetensors"
    p.write_bytes(whole[:20])
    cases.append((p, "not a valid safetensors file (truncated"))
    pickled = tmp / "pickled.pt"
    import pickle

    pickled.write_bytes(pickle.dumps({"layers.0.weight": [1.0]}))
    cases.append((pickled, "pickle"))
    return cases



def test_every_broken_resume_directory_is_refused(capsys, tmp_path):
    run = tmp_path / "run"
    argv = BASE + ["--epochs", "10", "--checkpoint-every", "5"]
    assert main(argv + ["--out", str(run)]) == 0
    ck_bytes = (run / checkpoint.filename("jax")).read_bytes()
    for name, content, needle in [
        ("trunc", ck_bytes[: len(ck_bytes) // 2], "not a valid safetensors"),
        ("empty", b"", "not a valid safetensors"),
        ("garbage", b"\x00" * 100, "not a valid safetensors"),
    ]:
        d = tmp_path / name
        d.mkdir()
        (d / checkpoint.filename("jax")).write_bytes(content)
        before = snapshot(d)
        assert main(["--resume", str(d)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0] and str(d) in err[0], err
        assert snapshot(d) == before
    # A checkpoint of other data: the digest catches it.
    other = tmp_path / "other"
    other.mkdir()
    c = checkpoint.load(str(run / checkpoint.filename("jax")))
    c.data_digest = "0" * 64
    checkpoint.save(str(other / checkpoint.filename("jax")), c)
    assert main(["--resume", str(other)]) == 2
    assert "data differ" in capsys.readouterr().err
    # A weights file is not a checkpoint.
    plain = tmp_path / "plain"
    plain.mkdir()
    interchange.write(str(plain / checkpoint.filename("jax")),
                      {n: np.zeros(s, np.float32) for n, s in interchange.shapes(4, 1).items()})
    assert main(["--resume", str(plain)]) == 2
    assert "not a checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_no_traceback_from_a_real_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT}
    bad = tmp_path / "bad.csv"
    bad.write_text("x,y\n1,oops\n")
    for argv in (["--epochs", "0"], ["--data", str(bad)], ["--nonsense"]):
        p = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "train.py"), *BASE,
                            *argv, "--out", str(tmp_path / "o")],
                           capture_output=True, text=True, env=env, timeout=300)
        assert p.returncode == 2, p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and "error: " in lines[0], p.stderr
        assert not (tmp_path / "o").exists()


# Property-based fuzzing of the readers: any bytes either read or raise UsageError.
FUZZ = hsettings(max_examples=60, deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(content=st.binary(max_size=400), suffix=st.sampled_from([".csv", ".npz"]))
def test_fuzz_data_reader_bytes(tmp_path, content, suffix):
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(content)
    try:
        ds = data.read(str(path), dtype="float32")
    except UsageError as e:
        assert str(path) in str(e) and "\n" not in str(e)
    else:
        assert ds.x.shape == ds.y.shape and ds.x.size > 0
        assert np.isfinite(ds.x.astype(np.float32)).all()


cell = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr),
                 st.text(alphabet="0123456789.-+eEnaif ,\"", max_size=8))


@FUZZ
@given(rows=st.lists(st.lists(cell, min_size=0, max_size=3), max_size=6),
       header=st.sampled_from(["x,y", "y,x", "x", "x,y,z", "", "X,Y"]))
def test_fuzz_csv_rows(tmp_path, rows, header):
    path = tmp_path / "rows.csv"
    path.write_text(header + "\n" + "\n".join(",".join(r) for r in rows) + "\n")
    try:
        ds = data.read(str(path), dtype="float32")
    except UsageError as e:
        assert str(path) in str(e) and "\n" not in str(e)
    else:
        assert header == "x,y" and ds.x.size > 0


@FUZZ
@given(content=st.binary(max_size=300))
def test_fuzz_weights_and_checkpoint_readers(tmp_path, content):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(content)
    for read in (lambda: interchange.read_weights(str(path), 4, 1, "float32"),
                 lambda: checkpoint.load(str(path))):
        with pytest.raises(UsageError):
            read()


@FUZZ
@given(cut=st.integers(min_value=0, max_value=2000), flip=st.integers(min_value=0, max_value=2000))
def test_fuzz_damaged_weights_file(tmp_path, cut, flip):
    # A real file, truncated or with one byte changed: read and checked, or refused.
    path = tmp_path / "w.safetensors"
    interchange.write(str(path), {n: np.ones(s, np.float32)
                                  for n, s in interchange.shapes(4, 1).items()})
    raw = bytearray(path.read_bytes())
    raw = raw[: max(0, len(raw) - cut)] if cut % 2 else raw
    if raw and flip % 3 == 0:
        raw[flip % len(raw)] ^= 0xFF
    path.write_bytes(bytes(raw))
    try:
        state = interchange.read_weights(str(path), 4, 1, "float32")
    except UsageError:
        return
    interchange.check(state, 4, 1, "float32")
