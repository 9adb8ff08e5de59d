"""A target network that follows the model by exponential moving average (BYOL, JEPA, DINO).

Updated after every optimizer step: ``target = m * target + (1 - m) * model`` with the
momentum ``m`` going from ``start`` to ``end`` on a cosine over the stage's steps.
"""

from __future__ import annotations

import copy
import math

import torch


def make_target(model: torch.nn.Module) -> torch.nn.Module:
    target = copy.deepcopy(model)
    target.requires_grad_(False)
    return target.eval()


def momentum_at(step: int, total: int, start: float, end: float) -> float:
    progress = min(1.0, step / max(1, total))
    return end - (end - start) * (math.cos(math.pi * progress) + 1) / 2


@torch.no_grad()
def ema_update(target: torch.nn.Module, model: torch.nn.Module, momentum: float) -> None:
    for t, p in zip(target.parameters(), model.parameters(), strict=True):
        t.lerp_(p.detach(), 1.0 - momentum)
    for tb, b in zip(target.buffers(), model.buffers(), strict=True):
        tb.copy_(b)
