"""Write hetcore/presets/lecture.safetensors: the lecture's data and initial weights, drawn
by torchhet exactly as the lecture's code draws them. Run once; tests check the file."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hetcore import interchange  # noqa: E402
from torchhet.lecture import lecture_draw  # noqa: E402

if __name__ == "__main__":
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "hetcore", "presets", interchange.PRESET_FILE)
    tmp = path + ".tmp"
    interchange.write(tmp, lecture_draw(), metadata={"source": "torchhet.lecture.lecture_draw"})
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    print(f"wrote {path}")
