"""The Router base class: decides where things go.

A router looks at model outputs (or a batch) and returns a :class:`Routing`: one boolean mask
per branch (which tokens exit early, which examples are hard, which patches are context) or a
ranking of candidates (beam search over configurations). Routers that need fitting implement
:meth:`calibrate` (e.g. choose a threshold on held-out data); whatever they learn lives in
:meth:`state_dict` so it is checkpointed with the run.

Example::

    class LossRouter(stagewise.Router):
        '''Examples whose loss is above a quantile are "hard".'''
        name = "myplugin.loss_quantile"
        Options = QuantileOptions          # a dataclass: hard_ratio: float = 0.5

        def calibrate(self, scores, state=None):
            self.threshold = float(torch.quantile(scores, 1 - self.options.hard_ratio))
            return {"threshold": self.threshold}

        def route(self, scores):
            hard = scores > self.threshold
            return stagewise.Routing(masks={"hard": hard, "easy": ~hard}, scores=scores)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from stagewise.schema import NoOptions

if TYPE_CHECKING:
    import torch


@dataclass
class Routing:
    """A routing decision: boolean masks per branch and/or candidates ranked best first."""

    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    ranking: torch.Tensor | None = None  # (N, K) candidate indices, best first
    scores: torch.Tensor | None = None  # what the decision was based on

    def ratio(self, branch: str) -> float:
        """The fraction of items routed to ``branch``."""
        mask = self.masks[branch]
        return float(mask.float().mean()) if mask.numel() else 0.0


class Router(ABC):
    """Decides where things go. Subclasses set ``name``/``Options`` and implement ``route``."""

    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions

    def __init__(self, options: Any = None):
        self.options = options if options is not None else self.Options()

    def calibrate(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Fit the router on held-out data; returns metrics (e.g. the chosen threshold)."""
        return {}

    @abstractmethod
    def route(self, *args: Any, **kwargs: Any) -> Routing:
        """Return the decision for one batch of outputs or examples."""

    def state_dict(self) -> dict[str, Any]:
        """What :meth:`calibrate` learned: tensors, numbers, strings, lists and dicts only."""
        return {k: v for k, v in vars(self).items() if k != "options"}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        vars(self).update(state)
