"""The Stage base class: one phase of a recipe.

A stage declares *what* happens in its phase; the engine owns *how* (seeding, checkpoints,
logging, resume). Most stages subclass :class:`stagewise.TrainStage`, which runs the engine's
training loop and lets a subclass change where batches come from or how outputs are computed.
A stage that does something else (mine hard examples, calibrate a router, export a cache)
subclasses :class:`Stage` and implements :meth:`run`.

Example::

    @dataclass
    class CountOptions:
        split: str = "valid"

    class CountTokens(stagewise.Stage):
        name = "myplugin.count"
        Options = CountOptions

        def run(self, state):
            n = sum(b["target"].numel() for b in state.batches(self.options.split, shard=False))
            state.artifacts["n_tokens"] = n
            return {"tokens": n}
"""

from __future__ import annotations

import dataclasses
import difflib
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

from stagewise.schema import NoOptions

if TYPE_CHECKING:
    from stagewise.data.splits import DataSplits
    from stagewise.engine.state import State
    from stagewise.recipe import Recipe



def _missing_split_hint(split: str, key: str, data: DataSplits) -> str:
    """How to give the data ``split`` when it is not a misspelling of one the data has (that one the list shows)."""
    if not split or difflib.get_close_matches(split, data.names(), n=1):
        return ""
    return (f"; give the data a {split!r} split (a folder of split files: add {split}.txt beside train.txt) "
            f"or set {key} to a split it has")


class Stage(ABC):
    """One phase of a recipe. Subclasses set ``name`` and ``Options`` and implement ``run``.

    Runs between ``Event.BEFORE_STAGE`` and ``Event.AFTER_STAGE``. A stage interrupted before
    it finished is run again from its start on resume, unless it checkpoints its own progress
    (as :class:`~stagewise.TrainStage` does, through ``state.save_checkpoint``).
    """

    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    # metrics this stage returns that are wall-clock measurements, by the last part of their name
    # (e.g. "speedup_measured"): summary.json lists them under "measured" and `stagewise verify`
    # compares them only where a golden record gives a tolerance
    measured: ClassVar[tuple[str, ...]] = ()

    def __init__(self, options: Any = None, label: str | None = None):
        self.options = options if options is not None else self.Options()
        self.label = label or self.name  # the recipe's name for this stage, e.g. "phase1"

    @abstractmethod
    def run(self, state: State) -> dict[str, Any]:
        """Do the stage's work on ``state`` and return its metrics (JSON-serialisable values)."""

    def check(self, recipe: Recipe, index: int, data: DataSplits) -> list[str]:
        """Problems to report before anything runs (nothing is written when there are any).

        The default checks that every option named ``split`` or ``*_split`` names a split of
        the data (``split`` must; another ``*_split`` may be "" for none). Override to add
        requirements, e.g. "needs a mining stage before this one"; call ``super().check(...)``
        to keep the split check. Name the stage as ``recipe.stage_path(index)`` does
        (``stages.NAME``, the way ``--set`` addresses it), e.g. ``f"{recipe.stage_path(index)}.split: ..."``.
        """
        problems = []
        for f in dataclasses.fields(self.options) if dataclasses.is_dataclass(self.options) else ():
            value = getattr(self.options, f.name)
            named = (f.name == "split" or f.name.endswith("_split")) and value and value not in data.names()
            if named or (f.name == "split" and not value):  # `split` is required; others may be "" (none)
                problems.append(f"{recipe.stage_path(index)}.{f.name}: no split named {value!r}; "
                                f"the data has: {', '.join(data.names())}{_missing_split_hint(value, f.name, data)}")
        return problems

    def fits_on(self) -> list[tuple[str, str]]:
        """``(split, what this stage does there)`` for each split it calibrates, mines or fits
        something on (beyond training the model's weights), e.g. ``[("valid", "calibrated the
        threshold")]``. A later stage that reports on such a split is not held-out:
        :meth:`Recipe.fitted_on <stagewise.recipe.Recipe.fitted_on>` names what happened there,
        and ``stagewise.evaluate`` refuses it unless ``allow_leak = true`` (:func:`leak_problems`).
        Default: none."""
        return []


def leak_problems(recipe: Recipe, index: int, split: str, allow_leak: bool) -> list[str]:
    """The problem a reporting stage raises in ``check`` when an earlier stage fitted on ``split``
    (see :meth:`Stage.fits_on`), unless its ``allow_leak`` option is set."""
    fitted = recipe.fitted_on(index, split)
    if not fitted or allow_leak:
        return []
    return [f"{recipe.stage_path(index)}.split: {split!r} is not held-out: {'; '.join(fitted)}; report on a "
            f"split no earlier stage fits on (or set allow_leak = true, e.g. to reproduce a published protocol)"]


def warn_not_held_out(state: State, label: str, split: str) -> None:
    """Warn once (``warnings/not_held_out``) when stage ``label`` reports on a split an earlier
    stage fitted on: only with ``allow_leak = true``, as :func:`leak_problems` refuses it otherwise."""
    fitted = state.recipe.fitted_on(state.stage_index, split)
    if fitted:
        state.warnings.warn("not_held_out", f"stage {label!r} reports on split {split!r}, where "
                            f"{'; '.join(fitted)} (allow_leak = true): its numbers are not held-out")
