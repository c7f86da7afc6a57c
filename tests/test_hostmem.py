"""hetcore.hostmem: freed host memory is reused without page faults (glibc only).

Counted, not timed: minor page faults (getrusage) while an epoch-like pattern allocates
eight 1 MiB blocks, touches them and frees them, fifty times over.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EPOCHS = """
import resource, sys
from hetcore import hostmem
state = hostmem.keep_freed_memory()
import numpy as np

def epoch():
    blocks = [np.ones(1 << 18, np.float32) for _ in range(8)]  # 8 x 1 MiB, touched
    del blocks

epoch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    epoch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(state)
"""


def _child(code: str, mode: str = "keep") -> list[str]:
    """Run `code` in a fresh interpreter (this process's heap would blur the counts); its
    output lines."""
    env = dict(os.environ, PYTHONPATH=ROOT, HET_HOST_MALLOC=mode)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, check=True, cwd=ROOT).stdout.splitlines()


def _faults(mode: str) -> tuple[int, str]:
    out = _child(EPOCHS, mode)
    return int(out[0]), out[1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_blocks_are_reused_without_page_faults():
    kept, state = _faults("keep")
    system, system_state = _faults("system")
    if "no glibc" in state:
        pytest.skip(state)
    assert state.startswith("glibc, freed blocks kept"), state
    assert system_state.startswith("system malloc")
    # 50 epochs x 8 MiB = 102,400 pages if every block is mapped afresh; with the blocks
    # kept, only the odd page of Python's own bookkeeping.
    assert system > 10_000, f"glibc's own setting reused the blocks ({system} faults)"
    assert kept < system / 20, f"kept {kept} faults against {system}"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_large_mode_says_so_and_reuses_too():
    faults, state = _faults("large")
    if "no glibc" in state:
        pytest.skip(state)
    assert "HET_HOST_MALLOC=large" in state and faults < 5_000, (faults, state)


def test_an_unknown_mode_is_one_clear_error(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, HET_HOST_MALLOC="jemalloc")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "train.py"),
                           "--epochs", "2", "--out", str(tmp_path / "run")], env=env,
                          capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and lines == [
        "error: HET_HOST_MALLOC=jemalloc: use keep (the default), large or system"], lines
    assert not (tmp_path / "run").exists()


def test_second_call_changes_nothing():
    from hetcore import hostmem

    assert hostmem.keep_freed_memory() == hostmem.keep_freed_memory()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_resident_peak_sees_what_a_block_touched_and_freed():
    code = """
import numpy as np
from hetcore import hostmem
hostmem.keep_freed_memory()
with hostmem.ResidentPeak() as idle:
    pass
with hostmem.ResidentPeak() as m:
    for _ in range(3):  # 64 MiB touched and freed three times: the peak is one of them
        a = np.ones(16 << 20, np.float32)
        del a
print(idle.bytes, m.bytes)
"""
    out = _child(code)[-1].split()
    if out[0] == "None":
        pytest.skip("this kernel offers no resettable high-water mark")
    idle, peak = int(out[0]), int(out[1])
    assert idle < 4 << 20
    assert 60 << 20 <= peak <= 80 << 20, peak


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_resident_peak_hands_blocks_back_inside_and_keeps_them_after():
    # Inside the block the kept thresholds give way to glibc's initial ones (1 MiB blocks
    # mapped afresh: faults), and after it, an exception included, they are back (none).
    code = EPOCHS.replace("print(state)", """
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        epoch()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

with hostmem.ResidentPeak():
    inside = faults()
after = faults()
try:
    with hostmem.ResidentPeak():
        raise ValueError
except ValueError:
    pass
print(inside, after, faults(), state)""")
    out = _child(code)[-1].split()
    inside, after, after_error = (int(v) for v in out[:3])
    if "no glibc" in out[3:]:
        pytest.skip("no glibc")
    assert inside > 20_000, inside  # 20 x 8 MiB mapped afresh: ~41,000 pages
    # after: the heap grows back once (one epoch's 8 MiB, 2,048 pages), then is reused
    assert after < 4_000 and after_error < 4_000, (after, after_error)
