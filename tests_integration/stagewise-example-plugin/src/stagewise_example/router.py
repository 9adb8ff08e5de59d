"""``example.loss_quantile``: examples whose loss is above a calibrated quantile are "hard"."""

from __future__ import annotations

from dataclasses import dataclass

import torch

import stagewise


@dataclass
class LossQuantileOptions:
    hard_ratio: float = 0.25  # fraction of the calibration examples that come out hard

    def __post_init__(self) -> None:
        if not 0 < self.hard_ratio < 1:
            raise ValueError(f"hard_ratio must be between 0 and 1, got {self.hard_ratio}")


def quantile_threshold(losses: torch.Tensor, hard_ratio: float) -> float:
    """The loss above which a ``hard_ratio`` fraction of ``losses`` (N,) lies."""
    return float(torch.quantile(losses.double(), 1.0 - hard_ratio))


class LossQuantile(stagewise.Router):
    """Route per-example losses (N,) to ``"hard"`` (above the threshold) or ``"easy"``.

    ``calibrate(losses)`` sets the threshold; it is the router's whole state, so
    ``state_dict()`` is ``{"threshold": ...}``.
    """

    name = "example.loss_quantile"
    Options = LossQuantileOptions

    def __init__(self, options: LossQuantileOptions | None = None):
        super().__init__(options)
        self.threshold: float | None = None

    def calibrate(self, losses: torch.Tensor) -> dict[str, float]:
        self.threshold = quantile_threshold(losses, self.options.hard_ratio)
        return {"threshold": self.threshold}

    def route(self, losses: torch.Tensor) -> stagewise.Routing:
        if self.threshold is None:
            raise RuntimeError("example.loss_quantile: call calibrate() before route()")
        hard = losses > self.threshold
        return stagewise.Routing(masks={"hard": hard, "easy": ~hard}, scores=losses)
