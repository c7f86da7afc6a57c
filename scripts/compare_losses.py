"""Fit MSE, NLL and beta-NLL to the same data and draw them side by side:
`python scripts/compare_losses.py --help`."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hetapps.compare import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
