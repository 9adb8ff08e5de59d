"""``lego_ashem.confidence``: per-token confidence at the exit layer; low confidence is "hard".

The seed's router: confidence is the maximum softmax probability of the exit layer's logits,
and the threshold is the ``hard_ratio`` quantile of the confidences on a calibration split, so
that ``hard_ratio`` of its tokens come out hard (``confidence < threshold``). Also the top-2
margin, the negative entropy, and a learned exit probe (``measure = "probe"``: the model's
``exit_probe`` scores the exit hidden state, so no exit softmax is needed to route). A finished
run's calibrated router comes back with :func:`stagewise_lego_ashem.load.load_router`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F

import stagewise
from stagewise.errors import TrainingError
from stagewise_lego_ashem.probe import probe_scores

if TYPE_CHECKING:
    from stagewise_lego_ashem.model import DeepSupervisionTransformer

Measure = Literal["max_prob", "margin", "neg_entropy", "probe"]
SOFTMAX_MEASURES = ("max_prob", "margin", "neg_entropy")


@dataclass
class ConfidenceOptions:
    measure: Measure = "max_prob"  # max_prob (the seed's), margin (top-1 minus top-2), neg_entropy, probe
    hard_ratio: float = 0.5  # fraction of the calibration tokens that come out hard (the seed's hard_example_ratio)

    def __post_init__(self) -> None:
        stagewise.check_options([(0 < self.hard_ratio < 1, "hard_ratio",
                                  f"must be strictly between 0 and 1, got {self.hard_ratio}")])


def confidence_from_logits(logits: torch.Tensor, measure: str) -> torch.Tensor:
    """Confidence of logits (..., V) -> (...): higher means surer."""
    if measure == "max_prob":
        # the fused softmax kernel, then the max: one vectorised pass over the vocabulary
        # (exp(amax - logsumexp) gives the same number but costs about twice the time on CPU)
        return torch.softmax(logits.float(), dim=-1).amax(-1)
    if measure == "margin":
        top2 = torch.softmax(logits.float(), dim=-1).topk(2, dim=-1).values  # (..., 2)
        return top2[..., 0] - top2[..., 1]
    if measure == "neg_entropy":
        log_p = F.log_softmax(logits.float(), dim=-1)
        return (log_p.exp() * log_p).sum(-1)
    raise ValueError(f"measure {measure!r} does not score logits; use one of {', '.join(SOFTMAX_MEASURES)}")


SCORE_ROWS = 128  # tokens per chunk: a chunk's logits are still in cache when its softmax reads them


def confidence_and_exit_logits(model: DeepSupervisionTransformer, h_exit: torch.Tensor,
                               measure: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The confidence (...) of the exit head's logits (..., V), and the logits, ``SCORE_ROWS`` tokens at a time.

    The same numbers as ``confidence_from_logits(model.logits_from_hidden(h_exit), measure)``
    (each token's row is computed alone either way), but the softmax reads each chunk of logits
    while the head has just written it, instead of reading a (B, T, V) tensor back from memory:
    on CPU that pass is memory-bound and, unchunked, costs about as much time as the head itself.
    """
    flat = h_exit.reshape(-1, h_exit.size(-1))  # (N, C)
    logits = flat.new_empty(flat.size(0), model.config.vocab_size)  # (N, V)
    confidence = torch.empty(flat.size(0), dtype=torch.float32, device=flat.device)
    for start in range(0, flat.size(0), SCORE_ROWS):
        rows = slice(start, start + SCORE_ROWS)
        confidence[rows] = confidence_from_logits(model.logits_from_hidden(flat[rows], out=logits[rows]), measure)
    return confidence.view(h_exit.shape[:-1]), logits.view(*h_exit.shape[:-1], -1)


def quantile_threshold(scores: torch.Tensor, hard_ratio: float) -> float:
    """The confidence below which a ``hard_ratio`` fraction of ``scores`` lies (torch.quantile)."""
    if not bool(torch.isfinite(scores).all()):  # a diverged model: a NaN threshold would route nothing
        raise TrainingError(f"lego_ashem.confidence: {int((~torch.isfinite(scores)).sum())} of {scores.numel()} "
                            f"calibration confidences are not finite, so the model has diverged; check the "
                            f"earlier stages' lr and their non-finite loss counts in metrics.jsonl")
    return float(torch.quantile(scores.flatten().double(), hard_ratio))


class Confidence(stagewise.Router):
    """Route tokens to ``"easy"`` (exit: confidence >= threshold) or ``"hard"`` (continue).

    ``score(model, h_exit)`` gives (confidence (B, T), exit logits (B, T, V) or None for the
    probe); ``calibrate(scores)`` sets ``threshold``; ``route(scores)`` splits. State:
    ``{"threshold": float}``.
    """

    name = "lego_ashem.confidence"
    Options = ConfidenceOptions

    def __init__(self, options: ConfidenceOptions | None = None):
        super().__init__(options)
        self.threshold: float | None = None

    def score(self, model: DeepSupervisionTransformer,
              h_exit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """In float32, also inside a bf16 run's autocast (``run.precision``): the threshold is compared with
        these confidences as calibration computed them, not as bfloat16 rounds the exit head's logits. A float32
        (or float64) ``h_exit`` passes unchanged."""
        with torch.autocast(h_exit.device.type, enabled=False):
            h_exit = h_exit.float() if h_exit.dtype.itemsize < 4 else h_exit
            if self.options.measure == "probe":
                probe = getattr(model, "exit_probe", None)  # getattr: a model of another class has none
                if probe is None:
                    raise ValueError("measure 'probe' needs a model with exit_probe = true, trained by "
                                     "lego_ashem.train_exit_probe")
                return probe_scores(probe, h_exit), None
            return confidence_and_exit_logits(model, h_exit, self.options.measure)

    def calibrate(self, scores: torch.Tensor) -> dict[str, float]:
        self.threshold = quantile_threshold(scores, self.options.hard_ratio)
        return {"threshold": self.threshold}

    def route(self, scores: torch.Tensor, threshold: float | None = None) -> stagewise.Routing:
        threshold = self.threshold if threshold is None else threshold
        if threshold is None:
            raise RuntimeError("lego_ashem.confidence: call calibrate() (or pass a threshold) before route()")
        easy = scores >= threshold
        return stagewise.Routing(masks={"easy": easy, "hard": ~easy}, scores=scores)
