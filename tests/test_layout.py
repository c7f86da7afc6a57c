"""The three layers: each framework package works without the other framework installed,
the base reaches no framework, and the project names nothing it does not ship."""

import ast
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

BLOCK = """
import sys
# None in sys.modules is how Python says "not installed" to every importer: `import torch`
# raises ModuleNotFoundError, importlib.util.find_spec('torch') returns None (as libraries
# that probe for optional backends, scoringrules among them, expect).
for name in {blocked!r}:
    sys.modules[name] = None
sys.argv = ['train.py'] + {argv!r}
from hetapps.train import main
code = main()
loaded = [m for m, v in sys.modules.items() if v is not None and m.split('.')[0] in {blocked!r}]
assert not loaded, 'imported a blocked module: ' + ', '.join(loaded)
sys.exit(code)
"""


@pytest.mark.parametrize("framework,blocked", [("jax", ["torch"]),
                                               ("torch", ["jax", "jaxlib", "flax", "optax"])])
@pytest.mark.slow
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
    code = BLOCK.format(blocked=["torch"], argv=argv)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, timeout=300)
    assert p.returncode == 2
    assert p.stderr.strip().startswith("error: --framework torch: cannot import it")


# The framework packages and the command layer, by their top-level import names.
FRAMEWORK_NAMES = {"jax", "jaxlib", "flax", "optax", "torch", "jaxhet", "torchhet", "hetapps"}
ALLOWED = {  # package -> top-level names it must not import
    "hetcore": FRAMEWORK_NAMES,
    "jaxhet": {"torch", "torchhet", "hetapps"},
    "torchhet": {"jax", "jaxlib", "flax", "optax", "jaxhet", "hetapps"},
}


def _imports(path):
    """Every module a file imports, anywhere in it (inside functions too), and whether it
    imports by name at run time (importlib, __import__)."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    names, dynamic = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call):
            f = node.func
            called = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if called in ("import_module", "__import__"):
                dynamic.append(node.lineno)
    return names, dynamic


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_each_layer_imports_only_what_lies_below_it(package):
    # hetcore reaches no framework, not inside a function and not by
    # name through importlib; the commands (hetapps) choose the framework. Each framework
    # package never imports the other, nor the commands above it.
    bad = []
    for name in sorted(os.listdir(os.path.join(ROOT, package))):
        if name.endswith(".py"):
            names, dynamic = _imports(os.path.join(ROOT, package, name))
            bad += [f"{package}/{name} imports {n}" for n in sorted(names & ALLOWED[package])]
            if package == "hetcore":
                bad += [f"{package}/{name}:{line} imports by name" for line in dynamic]
    assert bad == [], bad


def test_both_backends_implement_the_contract():
    import hetcore.backend as contract
    import jaxhet.backend as jb
    import jaxhet.measure as jm
    import torchhet.backend as tb
    import torchhet.measure as tm

    for backend, measure in ((jb, jm), (tb, tm)):
        assert isinstance(backend, contract.Backend), backend.__name__
        assert isinstance(measure, contract.Measure), measure.__name__
    # mirrored name for name: the same public functions on both sides
    public = lambda m: {n for n in dir(m) if not n.startswith("_")  # noqa: E731
                        and callable(getattr(m, n)) and getattr(getattr(m, n), "__module__",
                                                                 "").startswith(m.__name__)}
    assert public(jm) == public(tm)


def test_the_project_names_only_documents_it_ships():
    # Code and docs point to docs/*.md and to each other, never to a page the project does
    # not carry; every docs/ page a file names exists.
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    if not files:
        pytest.skip("not a git checkout")
    texts = {f: open(os.path.join(ROOT, f), encoding="utf-8", errors="replace").read()
             for f in files if f.endswith((".py", ".md", ".sh", ".toml", ".txt", "Makefile"))
             and os.path.exists(os.path.join(ROOT, f))}
    outside = ("SPEC" + " section", "SPEC" + ".md")  # spelt apart, so that this file passes
    bad = [f for f, t in texts.items() if any(o in t for o in outside)]
    assert bad == [], bad
    named = {(f, m) for f, t in texts.items()
             for m in re.findall(r"docs/([a-z_]+\.md)", t)}
    missing = sorted((f, m) for f, m in named if not os.path.exists(os.path.join(ROOT, "docs", m)))
    assert missing == [], missing
