"""The sweep that chose --recipe calibrated: `python scripts/recipe_sweep.py --help`."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hetapps.recipe_sweep import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
