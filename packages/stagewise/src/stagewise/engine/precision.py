"""Mixed precision: ``[run] precision`` as a context manager around forward passes and loss terms."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from stagewise.engine.state import State


def autocast(state: State, enabled: bool = True) -> AbstractContextManager[Any]:
    """The run's precision for the model's forward passes and loss terms inside the block.

    ``fp32`` (the default): no context at all, so float32 runs stay exactly as they were.
    ``bf16``: ``torch.autocast`` on the run's device type with bfloat16; parameters, their
    gradients, optimizer state and checkpoints stay float32. ``enabled=False`` turns a bf16
    run's autocast off inside the block, for numerically delicate code (a least-squares fit, a
    threshold compared with confidences); cast the bfloat16 tensors made before it with ``.float()``.
    """
    # a state without a recipe (one made by hand to call evaluate, in a test or a notebook) runs in float32
    run = getattr(getattr(state, "recipe", None), "run", None)
    if getattr(run, "precision", "fp32") == "fp32":
        return nullcontext()
    return torch.autocast(device_type=state.device.type, dtype=torch.bfloat16, enabled=enabled)
