"""The lecture's own draw of data and initial weights, reproduced step by step.

scripts/make_lecture_preset.py writes what this returns to hetcore/presets, so that jaxhet
can start from it without torch; a test checks that file against this function.
"""

from __future__ import annotations

import numpy as np
import torch

from hetcore.settings import LECTURE, LECTURE_SEED
from torchhet.model import HeteroscedasticMLP
from torchhet.weights import to_state_dict


def lecture_draw() -> dict[str, np.ndarray]:
    """x, y (float32, shape (500,)) and the initial weights, as the lecture's code draws them.

    The global torch RNG is used as the lecture uses it, inside fork_rng so that the caller's
    RNG state is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.random.manual_seed(LECTURE_SEED)
        x = torch.linspace(-3, 3, LECTURE["n_points"])
        x = x.reshape(x.size(0), 1).float()
        y_original = torch.sin(x)
        noise_std = 0.1 * (3 - torch.abs(x))
        noise = torch.randn_like(x) * noise_std
        y = y_original + noise
        net = HeteroscedasticMLP(LECTURE["width"], LECTURE["depth"])  # default init, next draws
    return {"x": x[:, 0].numpy().copy(), "y": y[:, 0].numpy().copy(), **to_state_dict(net)}
