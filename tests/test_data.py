"""Data sets: the generator's law, the lecture's draw, and the user's files."""

import re

import numpy as np
import pytest

from hetcore import data
from hetcore.errors import UsageError


def test_synthetic_follows_the_lecture_law():
    n = 20000
    ds = data.synthetic(n, seed=5)
    np.testing.assert_array_equal(ds.x, np.linspace(-3, 3, n))
    inner = np.abs(ds.x) < 3  # the two end points have zero noise
    z = (ds.y - np.sin(ds.x))[inner] / (0.1 * (3 - np.abs(ds.x[inner])))
    # Standardised residuals are N(0, 1): sampling error of the mean ~1/sqrt(n) = 0.007,
    # of the variance ~sqrt(2/n) = 0.01; bounds at about 5 standard errors.
    assert abs(z.mean()) < 0.035
    assert abs(z.var() - 1) < 0.05
    centre = np.abs(ds.x) < 0.5
    edge = np.abs(ds.x) > 2.5
    assert (ds.y - np.sin(ds.x))[centre].std() > 4 * (ds.y - np.sin(ds.x))[edge].std()


def test_synthetic_is_a_function_of_seed():
    a, b, c = data.synthetic(50, 1), data.synthetic(50, 1), data.synthetic(50, 2)
    np.testing.assert_array_equal(a.y, b.y)
    assert not np.array_equal(a.y, c.y)


def test_lecture_preset_file_equals_torchhet_draw():
    from hetcore import interchange
    from torchhet.lecture import lecture_draw

    shipped = interchange.read_preset()
    drawn = lecture_draw()
    assert sorted(shipped) == sorted(drawn)
    for name in drawn:
        assert shipped[name].dtype == drawn[name].dtype == np.float32, name
        np.testing.assert_array_equal(shipped[name], drawn[name], err_msg=name)


def test_lecture_draw_leaves_global_torch_rng_alone():
    import torch

    from torchhet.lecture import lecture_draw

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    lecture_draw()
    np.testing.assert_array_equal(torch.rand(3), expected)


@pytest.mark.parametrize("shape", [(7,), (7, 1)])
def test_read_npz_and_csv(tmp_path, shape):
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((2,) + shape)
    np.savez(tmp_path / "d.npz", x=x, y=y.astype(np.float32))
    ds = data.read(str(tmp_path / "d.npz"))
    np.testing.assert_array_equal(ds.x, x.reshape(-1))
    np.testing.assert_array_equal(ds.y, y.astype(np.float32).reshape(-1))
    assert not ds.synthetic
    with open(tmp_path / "d.csv", "w") as f:
        f.write("x,y\n" + "".join(f"{float(a)!r},{float(b)!r}\n" for a, b in zip(x.reshape(-1), y.reshape(-1))))
    ds = data.read(str(tmp_path / "d.csv"))
    np.testing.assert_array_equal(ds.x, x.reshape(-1))
    np.testing.assert_array_equal(ds.y, y.reshape(-1))
    cx, cy = ds.columns("float32")
    assert cx.shape == cy.shape == (7, 1) and cx.dtype == np.float32


BAD_CSV = {
    "empty": ("", "empty file"),
    "header": ("a,b\n1,2\n", "header"),
    "missing column": ("x\n1\n", "header"),
    "extra column": ("x,y,z\n1,2,3\n", "header"),
    "short row": ("x,y\n1,2\n3\n", "line 3"),
    "text": ("x,y\n1,abc\n", "line 2"),
    "nan": ("x,y\n1,2\n3,nan\n", "y[1]"),
    "inf": ("x,y\ninf,2\n", "x[0]"),
    "no rows": ("x,y\n", "no data points"),
    "float32 overflow": ("x,y\n1,1e300\n", "y[0]"),
}


@pytest.mark.parametrize("case", sorted(BAD_CSV))
def test_bad_csv_is_refused_with_a_reason(tmp_path, case):
    text, reason = BAD_CSV[case]
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(UsageError, match=re.escape(f"--data {path}: ") + ".*" + re.escape(reason)):
        data.read(str(path), dtype="float32")


def test_bad_npz_is_refused_with_a_reason(tmp_path):
    cases = {
        "missing": (dict(x=np.ones(3)), "missing array 'y'"),
        "extra": (dict(x=np.ones(3), y=np.ones(3), z=np.ones(3)), "unexpected arrays"),
        "lengths": (dict(x=np.ones(3), y=np.ones(4)), "x has 3 points but y has 4"),
        "2d": (dict(x=np.ones((3, 2)), y=np.ones(3)), "shape"),
        "strings": (dict(x=np.array(["a"]), y=np.ones(1)), "dtype"),
        "objects": (dict(x=np.array([1, None], dtype=object), y=np.ones(2)), "pickle"),
        "empty": (dict(x=np.ones(0), y=np.ones(0)), "no data points"),
        "nan": (dict(x=np.ones(2), y=np.array([1, np.nan])), "y\\[1\\]"),
    }
    for name, (arrays, reason) in cases.items():
        path = tmp_path / f"{name}.npz"
        np.savez(path, **arrays)
        with pytest.raises(UsageError, match=reason):
            data.read(str(path))
    (tmp_path / "trunc.npz").write_bytes((tmp_path / "nan.npz").read_bytes()[:40])
    with pytest.raises(UsageError, match="not a readable .npz"):
        data.read(str(tmp_path / "trunc.npz"))
    with pytest.raises(UsageError, match="no such file"):
        data.read(str(tmp_path / "absent.npz"))
    (tmp_path / "d.txt").write_text("x,y\n1,2\n")
    with pytest.raises(UsageError, match="unknown file type"):
        data.read(str(tmp_path / "d.txt"))


def test_two_sines_follows_its_law():
    from hetcore.settings import Settings

    ds = data.for_settings(Settings(preset="two-sines", seed=3, n_points=400))
    x, y = ds.x, ds.y
    np.testing.assert_array_equal(x, np.linspace(-3, 3, 400))
    on = np.isclose(y, np.sin(x), atol=0) | np.isclose(y, -np.sin(x), atol=0)
    assert on.all()  # every point on one of the two curves, no noise
    curve = np.random.default_rng(3).integers(0, 2, 400)
    np.testing.assert_array_equal(y, np.sin(x) * (2 * curve - 1))
    np.testing.assert_array_equal(ds.true_mean(), np.zeros(400))
    np.testing.assert_array_equal(ds.true_sigma(), np.abs(np.sin(x)))
    assert ds.source == "two-sines(n_points=400, seed=3)"
    assert not np.array_equal(data.for_settings(Settings(preset="two-sines", seed=4)).y,
                              data.for_settings(Settings(preset="two-sines", seed=3)).y)
