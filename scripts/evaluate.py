"""Evaluate a weights file on data: `python scripts/evaluate.py --help`."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hetapps.evaluate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
