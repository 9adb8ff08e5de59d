"""Dynamic mode decomposition: the least-squares linear operator between lifted states.

Given pairs (x_i, y_i) of lifted states, DMD solves min_K Σ ‖K x_i − y_i‖², i.e.
K = Y X⁺ with the Moore–Penrose pseudo-inverse (Schmid 2010; Williams et al. 2015 for lifted
"extended" DMD). The refresh blends the fit into the trained operator at a rate, as the seed
did, but from a buffer of token-level pairs instead of batch means, and deterministically.
"""

from __future__ import annotations

import torch

RTOL = 1e-6  # singular values below RTOL * σ_max are treated as zero (the seed's rank cut)


def dmd_operator(x: torch.Tensor, y: torch.Tensor, rtol: float = RTOL) -> torch.Tensor:
    """K (n, D, D) with y ≈ x K^T for row-vector pairs x, y (n, N, D), per layer."""
    return (torch.linalg.pinv(x.double(), rtol=rtol) @ y.double()).transpose(1, 2).to(x.dtype)


def blend(operator: torch.Tensor, fitted: torch.Tensor, rate: float) -> torch.Tensor:
    """(1 - rate) K + rate K_fit."""
    return torch.lerp(operator, fitted, rate)
