"""φ_l, K_l and ψ_l of every source layer, stacked so that all layers run in one batched matmul.

The state a Koopman model sees is the RMS-normalised hidden state ĥ = h / rms(h): the model's
output head normalises h anyway, so only its direction reaches the logits, and a scale-free
state keeps the backbone from shrinking the loss by shrinking h. Per source layer l:

- lifting   φ_l(h) = tanh(ĥ W_l + b_l)        (C -> D, nonlinear: the Koopman observables)
- operator  K_l                                (D x D, initialised to the identity)
- decoder   ψ_l(z) = z U_l + c_l               (D -> C, back to the normalised state)

Shapes: ``n`` source layers, ``M`` tokens, width ``C``, Koopman dimension ``D``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

EPS = 1e-6


def normalize_state(h: torch.Tensor) -> torch.Tensor:
    """ĥ = h / rms(h) over the last axis: the scale-free state that φ lifts and ψ decodes."""
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)


class KoopmanModules(nn.Module):
    """Parameters ``lift_weight`` (n, C, D), ``lift_bias`` (n, D), ``operator`` (n, D, D),
    ``decode_weight`` (n, D, C), ``decode_bias`` (n, C). Index ``j`` picks one source layer."""

    def __init__(self, n: int, width: int, dim: int):
        super().__init__()
        self.lift_weight = nn.Parameter(torch.randn(n, width, dim) / math.sqrt(width))
        self.lift_bias = nn.Parameter(torch.zeros(n, dim))
        # near identity, as in the seed: at first the lifted state is predicted to stay put
        self.operator = nn.Parameter(torch.eye(dim).repeat(n, 1, 1))
        self.decode_weight = nn.Parameter(torch.randn(n, dim, width) / math.sqrt(dim))
        self.decode_bias = nn.Parameter(torch.zeros(n, width))

    @staticmethod
    def shapes(n: int, width: int, dim: int) -> dict[str, tuple[int, ...]]:
        """Each parameter's shape, as ``__init__`` makes them: what a saved state dict must hold."""
        return {"lift_weight": (n, width, dim), "lift_bias": (n, dim), "operator": (n, dim, dim),
                "decode_weight": (n, dim, width), "decode_bias": (n, width)}

    def lift(self, h: torch.Tensor, j: slice = slice(None)) -> torch.Tensor:
        """φ: h (n, M, C) -> z (n, M, D)."""
        return self.lift_normalized(normalize_state(h), j)

    def lift_normalized(self, h_hat: torch.Tensor, j: slice = slice(None)) -> torch.Tensor:
        """φ of a state already normalised by :func:`normalize_state`: ĥ (n, M, C) -> z (n, M, D)."""
        return torch.tanh(torch.baddbmm(self.lift_bias[j, None], h_hat, self.lift_weight[j]))

    def advance(self, z: torch.Tensor, k: int = 1, j: slice = slice(None)) -> torch.Tensor:
        """K^k z for z (n, M, D): k applications of each layer's operator (row vectors: z K^T)."""
        k_t = self.operator[j].transpose(1, 2)  # (n, D, D)
        for _ in range(k):
            z = torch.bmm(z, k_t)
        return z

    def decode(self, z: torch.Tensor, j: slice = slice(None)) -> torch.Tensor:
        """ψ: z (n, M, D) -> ĥ (n, M, C), an estimate of the normalised state."""
        return torch.baddbmm(self.decode_bias[j, None], z, self.decode_weight[j])

    def spectral_excess(self) -> torch.Tensor:
        """Σ relu(σ_i(K_l) - 1)², averaged over layers: 0 when every singular value is ≤ 1.

        σ_max ≤ 1 bounds the spectral radius, so where it is 0 every eigenvalue is in the closed unit
        disc (a penalty, not a projection: the other parts and the DMD blend can hold K outside);
        singular values (unlike eigenvalues) have stable gradients even when they repeat, as
        they do at the identity initialisation.
        """
        return torch.relu(torch.linalg.svdvals(self.operator) - 1).pow(2).sum(-1).mean()

    @torch.no_grad()
    def eigenvalues(self) -> torch.Tensor:
        """Complex eigenvalues of each K_l, (n, D), for reports and the spectrum plot."""
        return torch.linalg.eigvals(self.operator.double())
