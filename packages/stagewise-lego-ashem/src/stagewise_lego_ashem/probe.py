"""The learned exit classifier: a linear probe on the exit hidden state.

Max-softmax confidence needs the full-vocabulary head at the exit for every token, which in a
small model can cost more than the layers it skips. The probe (CALM, Schuster et al. 2022;
LayerSkip, Elhoushi et al. 2024) predicts from the exit hidden state alone whether the exit
layer's argmax equals the last layer's, so a token that continues never pays for an exit softmax.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

import stagewise
from stagewise_lego_ashem.rows import collect_rows

if TYPE_CHECKING:
    from stagewise_lego_ashem.model import DeepSupervisionTransformer


@torch.no_grad()
def probe_data(model: DeepSupervisionTransformer, batches: Iterable[dict[str, Any]], *,
               windows: int) -> dict[str, torch.Tensor]:
    """Exit hidden states (N, C) of every token of the ``windows`` windows of ``batches`` and labels
    (N,): exit argmax == last-layer argmax."""
    with stagewise.eval_mode(model):
        rows = collect_rows((_probe_rows(model, batch["input"]) for batch in batches), windows)
    return {"hidden": rows["hidden"].flatten(0, 1), "label": rows["label"].flatten()}


def _probe_rows(model: DeepSupervisionTransformer, idx: torch.Tensor) -> dict[str, torch.Tensor]:
    h = model.exit_hidden(idx)  # (B, T, C)
    final = model.logits_from_hidden(model.run_layers(h, model.exit_layer, model.config.n_layer))
    return {"hidden": h, "label": model.logits_from_hidden(h).argmax(-1) == final.argmax(-1)}  # label: (B, T)


def probe_scores(probe: torch.nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """The probe's probability that a token may exit: hidden (..., C) -> (...); the router's
    ``measure = "probe"`` confidence."""
    with torch.no_grad():
        return torch.sigmoid(probe(hidden).squeeze(-1).float())


def fit_probe(probe: torch.nn.Linear, data: dict[str, torch.Tensor], *, epochs: int, lr: float,
              batch_size: int, seed: int) -> float:
    """Train the probe with binary cross-entropy (AdamW, seeded order); returns the last epoch's mean loss."""
    probe.requires_grad_(True)  # an earlier stage's parameter selection may have frozen it
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    hidden, label = data["hidden"], data["label"].float()
    mean = float("nan")
    for _ in range(epochs):
        order = torch.randperm(len(hidden), generator=generator)
        total = 0.0
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            loss = F.binary_cross_entropy_with_logits(probe(hidden[rows]).squeeze(-1), label[rows].to(hidden.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(rows)
        mean = total / len(order)
    return mean
