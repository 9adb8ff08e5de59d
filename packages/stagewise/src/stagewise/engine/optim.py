"""Optimizers and learning-rate schedules, rebuilt at every stage boundary."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch


def build_optimizer(params: list[torch.nn.Parameter], o: Any) -> torch.optim.Optimizer:
    """AdamW, SGD or L-BFGS from a stage's options (see ``TrainOptions``).

    AdamW and SGD take torch's multi-tensor (``foreach``) path on every device, not only on CUDA:
    the same kernels in the same order, so bit for bit the same steps, but one call per operation
    for all parameters instead of one per parameter, which dominates a small model's step on the CPU.
    """
    if o.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, foreach=True)
    if o.optimizer == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, foreach=True)
    # L-BFGS re-evaluates the loss inside step(closure); strong Wolfe line search keeps it stable
    return torch.optim.LBFGS(params, lr=o.lr, max_iter=o.lbfgs_max_iter,
                             history_size=o.lbfgs_history, line_search_fn="strong_wolfe")


def build_scheduler(optimizer: torch.optim.Optimizer, o: Any, total_steps: int) -> Any:
    """A per-step LambdaLR (constant, warmup, cosine) or an epoch-level ReduceLROnPlateau."""
    if o.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode=o.mode, factor=o.plateau_factor, patience=o.plateau_patience)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(o, total_steps))


def lr_factor(o: Any, total_steps: int) -> Callable[[int], float]:
    """The function LambdaLR calls: ``factor(step)``, the multiplier of the base lr after ``step``
    optimizer steps of the stage's ``total_steps`` (the warmup, then constant or the cosine to ``min_lr``)."""
    warmup = o.warmup_steps if o.schedule in ("warmup", "cosine") else 0
    floor = o.min_lr / o.lr if o.lr > 0 else 0.0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if o.schedule != "cosine":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
