"""State dicts to and from the interchange form; mirrors jaxhet/weights.py.

torch's own layout is the interchange layout, so nothing is renamed or transposed; the
names and shapes are still checked by load_state_dict(strict=True).
"""

from __future__ import annotations

import numpy as np
import torch

from hetcore.errors import UsageError
from hetcore.interchange import architecture
from torchhet.model import HeteroscedasticMLP

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def to_state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Module parameters -> numpy arrays (copies), in module order."""
    return {n: t.detach().cpu().numpy().copy() for n, t in model.state_dict().items()}


def from_state_dict(state: dict, model: torch.nn.Module) -> torch.nn.Module:
    """Load numpy arrays into `model` in place; raises UsageError on a misfit tensor."""
    own = model.state_dict()
    for name in own:
        if name not in state:
            raise UsageError(f"weights: missing tensor '{name}'")
    for name in state:
        if name not in own:
            raise UsageError(f"weights: unexpected tensor '{name}'")
        if tuple(np.shape(state[name])) != tuple(own[name].shape):
            raise UsageError(
                f"weights: tensor '{name}' has shape {tuple(np.shape(state[name]))}, "
                f"expected {tuple(own[name].shape)}"
            )
    # A copy: arrays read from files are read-only, and torch tensors must own writable memory.
    tensors = {n: torch.from_numpy(np.array(state[n], copy=True)).to(own[n].dtype) for n in own}
    model.load_state_dict(tensors, strict=True)
    return model


def put(state: dict, dtype: str, device: torch.device, width: int | None = None,
        depth: int | None = None) -> HeteroscedasticMLP:
    """A state dict as a model of `width` and `depth` (default: the state's own) in `dtype`
    on `device`; a tensor that does not fit is a UsageError naming it."""
    if width is None or depth is None:
        width, depth = architecture(state)
    model = HeteroscedasticMLP(width, depth, dtype=DTYPES[dtype])
    from_state_dict({n: np.asarray(a, dtype=dtype) for n, a in state.items()}, model)
    return model.to(device)
