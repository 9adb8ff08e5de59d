"""The built-in stage ``stagewise.evaluate``: loss-term metrics on a split, no training."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from stagewise.builtins.train import _default_losses
from stagewise.engine.evaluate import evaluate
from stagewise.engine.objective import build_terms, loss_problems
from stagewise.schema import check_options
from stagewise.specs import LossSpec
from stagewise.stage import Stage, leak_problems, warn_not_held_out

if TYPE_CHECKING:
    from stagewise.data.splits import DataSplits
    from stagewise.engine.state import State
    from stagewise.recipe import Recipe


@dataclass
class EvaluateOptions:
    """Recipe keys of ``stagewise.evaluate``."""

    split: str = "test"  # the data split to evaluate
    losses: list[LossSpec] = field(default_factory=_default_losses)  # terms to report
    prefix: str | None = None  # metric prefix; default: the split name
    allow_leak: bool = False  # true lets split be one an earlier stage calibrated, mined or fitted on

    def __post_init__(self) -> None:
        check_options([(bool(self.losses), "losses", "at least one loss term is required")])


class EvaluateStage(Stage):
    """Report every loss term's metrics on a split, e.g. ``test/loss``, ``test/ppl``. Refuses a
    split an earlier stage calibrated, mined or fitted on (its ``fits_on``) unless ``allow_leak``."""

    name = "stagewise.evaluate"
    Options = EvaluateOptions

    def check(self, recipe: Recipe, index: int, data: DataSplits) -> list[str]:
        o = self.options
        return (super().check(recipe, index, data) + leak_problems(recipe, index, o.split, o.allow_leak)
                + loss_problems(o.losses, recipe.model_options_at(index), data.example(o.split),
                                recipe.stage_path(index)))

    def run(self, state: State) -> dict[str, Any]:
        o = self.options
        warn_not_held_out(state, self.label, o.split)
        terms = build_terms(o.losses, state, state.recipe.stage_path(state.stage_index))
        return evaluate(state, terms, state.batches(o.split, desc=f"evaluating {o.split}"), o.prefix or o.split)
