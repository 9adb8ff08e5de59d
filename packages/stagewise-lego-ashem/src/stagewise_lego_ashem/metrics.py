"""What routing costs: the seed's layer-count model and counted FLOPs, side by side.

``compute_cost`` (:func:`seed_compute_cost`) is the seed's model, (shallow·exit + deep·L) / (total·L):
layers only, no head, no confidence, no attention context. ``compute_cost_flops`` counts what the routed
forward of :mod:`stagewise_lego_ashem.routed` really does, relative to a full-depth forward:
projections and feed-forwards (2 FLOPs per multiply-add), attention scores and values over each
token's causal context, the output head wherever it runs, the confidence (a full-vocabulary
softmax at the exit for every token, or the probe), and the upper layers' keys/values for
every position of a batch that holds a hard token. Norms, RoPE and the embedding lookup are left
out (O(C) per token), and so is work spent on padding and masks: the routed blocks' queries of the
B x M slots beyond the hard rows (M: most hard tokens in a sequence) and attention scores at
masked positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from stagewise_lego_ashem.model import DeepSupervisionTransformer

FLOPS_PER_MAC = 2  # a multiply-add counts as two FLOPs
TRAIN_STEP_FORWARDS = 3  # a training step costs about three forwards: the forward, and a backward of about two
# FLOPs per vocabulary entry of each confidence measure, on top of the exit head's logits
_CONFIDENCE_PER_VOCAB = {"max_prob": 3, "margin": 4, "neg_entropy": 5}


@dataclass(frozen=True)
class Shape:
    """The sizes that fix a transformer's FLOPs: width, feed-forward width, vocabulary, depth, exit."""

    n_embd: int
    ffn_hidden: int
    vocab_size: int
    n_layer: int
    exit_layer: int

    @classmethod
    def of(cls, model: DeepSupervisionTransformer) -> Shape:
        c = model.config
        return cls(c.n_embd, c.ffn_hidden, c.vocab_size, c.n_layer, model.exit_layer)

    def kv(self) -> float:
        """Keys and values of one position in one block (two C x C projections)."""
        return 2 * FLOPS_PER_MAC * self.n_embd ** 2

    def query_rest(self, context: float) -> float:
        """The rest of one block for one query row: q and the output projection (two C x C),
        the SwiGLU feed-forward (three C x ffn_hidden), attention scores and values over ``context`` positions."""
        C = self.n_embd
        return FLOPS_PER_MAC * (2 * C * C + 3 * C * self.ffn_hidden) + 2 * FLOPS_PER_MAC * context * C

    def block(self, context: float) -> float:
        return self.kv() + self.query_rest(context)

    def query_rows(self, n: float, context: float) -> float:
        """Everything but keys/values for ``n`` rows whose contexts sum to ``context``."""
        return n * self.query_rest(0) + 2 * FLOPS_PER_MAC * context * self.n_embd

    def rows(self, n: float, context: float) -> float:
        """Whole blocks for ``n`` rows whose contexts sum to ``context``."""
        return n * self.kv() + self.query_rows(n, context)

    def head(self) -> float:
        return FLOPS_PER_MAC * self.n_embd * self.vocab_size

    def confidence(self, measure: str) -> float:
        return FLOPS_PER_MAC * self.n_embd if measure == "probe" else _CONFIDENCE_PER_VOCAB[measure] * self.vocab_size


def seed_compute_cost(shallow: int, total: int, exit_layer: int, n_layer: int) -> float:
    """The seed's layer-count cost of routing, relative to the full depth."""
    return (shallow * exit_layer + (total - shallow) * n_layer) / (total * n_layer)


def context_sum(mask: torch.Tensor) -> float:
    """Σ (t + 1) over the True positions of ``mask`` (B, T): attention context of those rows."""
    positions = torch.arange(1, mask.size(-1) + 1, dtype=torch.float64, device=mask.device)
    return float((mask.double() * positions).sum())


def full_depth_flops(shape: Shape, every: torch.Tensor) -> float:
    """FLOPs of the plain forward on the positions of ``every`` (B, T): all layers, one head."""
    n = float(every.sum())
    return shape.n_layer * shape.rows(n, context_sum(every)) + n * shape.head()


def routed_flops(shape: Shape, easy: torch.Tensor, measure: str) -> float:
    """FLOPs of the routed forward on a batch whose exiting tokens are ``easy`` (B, T)."""
    hard = ~easy
    n, n_easy, n_hard = float(easy.numel()), float(easy.sum()), float(hard.sum())
    lower = shape.exit_layer * shape.rows(n, context_sum(torch.ones_like(easy)))
    exit_heads = n if measure != "probe" else n_easy  # softmax measures need the exit head for every token
    return (lower + n * shape.confidence(measure) + exit_heads * shape.head()
            + _upper_routed(shape, hard) + n_hard * shape.head())


def phase2_step_flops(shape: Shape, hard: torch.Tensor) -> dict[str, float]:
    """Counted FLOPs of one phase-2 step on cached windows with hard rows ``hard`` (B, T).

    ``cache``: upper layers forward + backward (backward ≈ 2 × forward) in the routed rule of
    ``context = "full"``; ``lower``: the frozen lower layers' forward a full-forward step adds.
    """
    forward = _upper_routed(shape, hard) + float(hard.sum()) * shape.head()
    lower = shape.exit_layer * shape.rows(float(hard.numel()), context_sum(torch.ones_like(hard)))
    return {"cache": TRAIN_STEP_FORWARDS * forward, "lower": lower}


def token_step_flops(shape: Shape, n_tokens: int) -> float:
    """Counted FLOPs of a token-mode step: upper layers on length-1 sequences, head, × TRAIN_STEP_FORWARDS."""
    return TRAIN_STEP_FORWARDS * n_tokens * ((shape.n_layer - shape.exit_layer) * shape.block(1) + shape.head())


def _upper_routed(shape: Shape, hard: torch.Tensor) -> float:
    """The upper blocks in the routed rule: keys/values for every position, the rest for hard rows;
    nothing without a hard row (no query would read those keys/values: ``routed_layers`` returns at once)."""
    if not bool(hard.any()):
        return 0.0
    upper = shape.n_layer - shape.exit_layer
    return upper * (float(hard.numel()) * shape.kv() + shape.query_rows(float(hard.sum()), context_sum(hard)))
