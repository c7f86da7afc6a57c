"""Benchmark every training loop of jaxhet and torchhet: `python scripts/bench.py [options]`.

Writes bench.json, bench.txt and bench.{png,svg} (or, with --sweep, sweep.json and
sweep.{png,svg}) under --out; see docs/performance.md and hetapps/bench/.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hetapps.bench.command import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
