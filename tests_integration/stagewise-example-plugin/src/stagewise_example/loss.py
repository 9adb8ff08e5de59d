"""``example.entropy_bonus``: reward spread-out predictions (a confidence penalty).

The term is the negative mean entropy of the model's predictive distribution, so minimising
it raises the entropy; with a small weight it keeps a classifier or language model from
becoming over-confident (Pereyra et al. 2017, https://arxiv.org/abs/1701.06548).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import stagewise


@dataclass
class EntropyBonusOptions:
    normalize: bool = True  # divide by log(number of classes), so the term lies in [-1, 0]


def entropy_bonus(logits: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Negative mean entropy of softmax(logits) over the last axis; a scalar."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1).mean()
    return -entropy / math.log(logits.shape[-1]) if normalize else -entropy


class EntropyBonus(stagewise.Loss):
    """Add it to a stage's ``losses`` with a small weight, e.g.
    ``{ use = "example.entropy_bonus", weight = 0.05 }``. Reads the model's ``"logits"``."""

    name = "example.entropy_bonus"
    Options = EntropyBonusOptions

    def forward(self, outputs, batch, state):
        return entropy_bonus(outputs["logits"], self.options.normalize)
