"""Per-example gates that really skip work: run a block on the selected rows only.

``run_rows(block, h, keep)`` gathers the rows of ``h`` where ``keep`` is True, runs
``block`` on those alone and scatters the results back; the other rows pass through
unchanged. The skipped rows cost nothing but the gather and scatter, which is what makes a
routed model faster in wall-clock time and not only in a compute model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def run_rows(block: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``block`` applied to ``h[keep]`` (rows along dim 0); other rows of ``h`` unchanged."""
    if keep.dim() != 1 or keep.shape[0] != h.shape[0]:
        raise ValueError(f"keep must be a (B,) mask for h of shape {tuple(h.shape)}, got {tuple(keep.shape)}")
    rows = keep.nonzero().squeeze(1)
    if rows.numel() == h.shape[0]:
        return block(h)
    if rows.numel() == 0:
        return h
    return h.index_copy(0, rows, block(h.index_select(0, rows)))  # out of place: h is untouched
