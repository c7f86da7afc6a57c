"""`python -m hetapps.bench`: the benchmark command (hetapps.bench.command)."""

import sys

from hetapps.bench.command import main

if __name__ == "__main__":
    sys.exit(main())
