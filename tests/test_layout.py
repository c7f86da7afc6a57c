"""SPEC section 5: each framework package works without the other framework installed."""

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

BLOCK = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {blocked!r}:
            raise ImportError('blocked for the test: ' + name)
sys.meta_path.insert(0, Block())
sys.argv = ['train.py'] + {argv!r}
from hetcore.cli import main
code = main()
assert not any(m.split('.')[0] in {blocked!r} for m in sys.modules), 'imported a blocked module'
sys.exit(code)
"""


@pytest.mark.parametrize("framework,blocked", [("jax", ["torch"]),
                                               ("torch", ["jax", "jaxlib", "flax", "optax"])])
def test_one_framework_runs_with_the_other_missing(tmp_path, framework, blocked):
    argv = ["--framework", framework, "--preset", "none", "--width", "4", "--depth", "1",
            "--n-points", "10", "--epochs", "2", "--device", "cpu", "--no-progress",
            "--out", str(tmp_path / "run")]
    code = BLOCK.format(blocked=blocked, argv=argv)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, timeout=300)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "run" / "metrics.json").exists()


def test_missing_framework_is_a_clear_error(tmp_path):
    argv = ["--framework", "torch", "--out", str(tmp_path / "run")]
    code = BLOCK.format(blocked=["torch"], argv=argv).replace(
        "assert not any", "pass  # assert not any")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, timeout=300)
    assert p.returncode == 2
    assert p.stderr.strip().startswith("error: --framework torch: cannot import it")
