"""The one object every stage, loss, router and event hook sees: the run's state."""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from stagewise import plugins
from stagewise.engine.progress import progress_bar
from stagewise.errors import PluginError
from stagewise.events import Event

if TYPE_CHECKING:
    from pathlib import Path

    from stagewise.data.splits import DataSplits
    from stagewise.engine.distributed import DistInfo
    from stagewise.engine.guards import RateLimitedWarnings
    from stagewise.engine.rundir import RunDir
    from stagewise.recipe import Recipe
    from stagewise.router import Router


@dataclass
class State:
    """Everything a run holds. Stages read and change it; the engine checkpoints it.

    ``artifacts`` hold what a stage hands to later ones (a threshold, cached hidden states, a
    trained encoder's state dict); they must be tensors, numbers, strings, lists or dicts so
    checkpoints load with ``weights_only=True``. ``routers`` hold the routers stages calibrated
    (:meth:`keep_router`), which ``stagewise export`` writes beside the weights.
    """

    recipe: Recipe
    model: torch.nn.Module
    model_options: Any  # the model's Options, as changed by ``grow``
    data: DataSplits
    device: torch.device
    dist: DistInfo
    warnings: RateLimitedWarnings
    run_dir: RunDir | None = None  # None on ranks other than 0
    quiet: bool = False
    artifacts: dict[str, Any] = field(default_factory=dict)
    routers: dict[str, Any] = field(default_factory=dict)  # name -> {"use", "options", "state"}, see keep_router
    stage_index: int = 0
    stage_name: str = ""
    epoch: int = 0  # 0-based epoch within the current stage
    step: int = 0  # optimizer steps taken in the current stage
    epochs_run: int = 0  # epochs the current stage has completed
    target_model: torch.nn.Module | None = None  # EMA copy of the model, when a stage asks for one
    terms: dict[str, Any] = field(default_factory=dict)  # the training stage's loss terms, by name
    # each term's scheduled weight this epoch, by name; 0: not trained (under torchrun still computed)
    term_weights: dict[str, float] = field(default_factory=dict)
    resume: dict[str, Any] | None = None  # the checkpoint a resumed stage continues from
    resumed_from: Path | None = None  # a resumed run's directory, whose checkpoints/last.pt ``resume`` is
    stage_started: float = 0.0  # perf_counter() at the stage's start, as if a resumed stage had never stopped
    metrics: dict[str, Any] = field(default_factory=dict)  # final metrics so far, all stages
    stage_results: dict[str, Any] = field(default_factory=dict)  # summary.json "stages"

    @property
    def seed(self) -> int:
        return self.recipe.run.seed

    @property
    def is_main(self) -> bool:
        return self.dist.rank == 0

    def fire(self, event: Event, **kwargs: Any) -> None:
        """Call the hook for ``event`` in the order :func:`event_hookimpls` gives.

        :func:`stagewise.engine.failures.failure_note` finds this frame in a failed run's traceback
        and reads its locals ``event`` and ``impl`` to name the hook and plugin a bug came from:
        keep those names.
        """
        impls = event_hookimpls(event)
        if not impls:
            return
        plugins.trace(event.hook_name, impls)
        kwargs = {"state": self, **kwargs}
        for impl in impls:
            impl.function(**{name: kwargs[name] for name in impl.argnames})

    def log(self, event: str, **values: Any) -> None:
        """Append one record to ``metrics.jsonl`` (main process only)."""
        if self.run_dir is not None:
            record = {"event": event, "stage": self.stage_name, "epoch": self.epoch, "step": self.step}
            self.run_dir.log({**record, **values})

    def batches(self, source: Any, *, train: bool = False, epoch: int = 0, start: int = 0,
                indices: list[int] | None = None, shard: bool = True, desc: str | None = None):
        """Batches on the run's device of a split (by name) or of any map-style dataset (a cache).

        ``train=True`` shuffles with an order fixed by (seed, stage, epoch). Under ``torchrun``
        each global batch is split across processes (sum what you measure over ranks, e.g. with
        :func:`stagewise.engine.distributed.all_reduce_sums`); ``shard=False`` gives every
        process the whole source, for results every rank must hold alike (a cache, a
        calibration). ``start`` skips batches (resume); ``indices`` keeps only those examples
        (e.g. the hard ones). ``desc`` shows them as a progress bar (:meth:`progress`). See
        :mod:`stagewise.engine.batches`.
        """
        from stagewise.engine.batches import count_batches, iterate_batches

        batches = iterate_batches(self, source, train=train, epoch=epoch, start=start, indices=indices, shard=shard)
        if desc is None:
            return batches
        total = count_batches(self, source, train=train, indices=indices, shard=shard)
        return self.progress(batches, desc=desc, total=total, initial=start)

    def progress(self, iterable: Iterable[Any], *, desc: str, total: int | None = None, initial: int = 0) -> Any:
        """``iterable`` as a tqdm progress bar named ``<stage>: <desc>`` on stderr; the bar is
        shown only on the main process of a run without ``--quiet``, when stderr is a terminal
        (not in tests or logs), and is cleared when done. It only counts: no metric changes.
        ``total`` defaults to ``len(iterable)``; ``initial`` is where a resumed iteration starts."""
        shown = not self.quiet and self.is_main and sys.stderr.isatty()
        return progress_bar(iterable, desc=f"{self.stage_name}: {desc}" if self.stage_name else desc, shown=shown,
                            total=total, initial=initial)

    def keep_router(self, name: str, router: Router) -> None:
        """Checkpoint ``router`` under ``name`` as it is now: its registered name (``use``), options
        and :meth:`~stagewise.Router.state_dict` (e.g. a calibrated threshold). ``stagewise export``
        writes every kept router into the export, so the exported model routes as the run did;
        keeping a name again replaces it (e.g. a later stage that recalibrates the router)."""
        from stagewise.schema import as_table

        self.routers[name] = {"use": router.name, "options": as_table(router.options), "state": router.state_dict()}

    def save_checkpoint(self, *, done: bool, extra: dict[str, Any] | None = None) -> None:
        """Write ``checkpoints/last.pt`` (and the stage's own checkpoint when it is ``done``)."""
        from stagewise.engine.checkpoint import unreadable, write_checkpoint
        from stagewise.engine.distributed import barrier

        refused = unreadable(self.artifacts, "state.artifacts") + unreadable(self.routers, "state.routers")
        if refused:  # every rank holds them alike, so every rank stops here
            raise PluginError(f"stage {self.stage_name!r}: a checkpoint cannot hold {', '.join(refused)}: checkpoints "
                              f"are read with torch.load(weights_only=True), so keep artifacts and router state to "
                              f"tensors, numbers, strings, lists and dicts (e.g. torch.from_numpy(array), float(x))")
        if self.run_dir is not None:
            name = self.recipe.stages[self.stage_index].checkpoint if done else None
            files = ([f"{name}.pt"] if name else []) + ["last.pt"]
            write_checkpoint(self.checkpoint_payload(done, extra or {}), [self.run_dir.checkpoints / f for f in files])
        barrier(self.dist)

    def checkpoint_payload(self, done: bool, extra: dict[str, Any]) -> dict[str, Any]:
        """What every checkpoint holds, plus a stage's ``extra`` (TrainLoop's optimizer, position, ...).
        A key that a resume needs goes into :data:`~stagewise.engine.checkpoint.RESUME_KEYS` too."""
        from stagewise.engine.checkpoint import rng_state
        from stagewise.load import plain_info
        from stagewise.plugins import versions
        from stagewise.schema import as_table

        return {
            "versions": versions(),  # a resume by other code is refused: it may end with neither code's numbers
            "recipe": self.recipe.table,
            "stage_index": self.stage_index,
            "stage_name": self.stage_name,
            "stage_done": done,
            "model": self.model.state_dict(),
            "model_options": as_table(self.model_options),
            "data_info": plain_info(self.data.info),  # what the model was built from: load_model builds it again
            "artifacts": self.artifacts,
            "routers": self.routers,
            "metrics": self.metrics,
            "stage_results": self.stage_results,
            "rng": rng_state(),
            "metrics_lines": self.run_dir.lines if self.run_dir is not None else 0,
            "stage_seconds": time.perf_counter() - self.stage_started,  # a resumed stage's seconds go on from here
            **extra,
        }

    def print(self, message: str) -> None:
        if not self.quiet and self.is_main:
            print(message, flush=True)


def event_hookimpls(event: Event) -> tuple[Any, ...]:
    """The implementations of ``event``'s hook in call order: ``tryfirst`` ones, then plain
    ones, then ``trylast`` ones; within each, "before" hooks in registration order and "after"
    hooks reversed, so that a plugin can undo what it did.

    The engine calls each implementation itself (pluggy's own order is last-registered first),
    so wrappers, which pluggy would run around the others, are refused.
    """
    impls = getattr(plugins.plugin_manager().hook, event.hook_name).get_hookimpls()
    # ordered once per set of implementations, not at every step (BEFORE_STEP and AFTER_STEP)
    return _call_order(event.hook_name, tuple(impls), event.is_after) if impls else ()


@functools.lru_cache(maxsize=64)
def _call_order(hook_name: str, impls: tuple[Any, ...], is_after: bool) -> tuple[Any, ...]:
    """:func:`event_hookimpls` for one hook's ``impls`` (in pluggy's order). Registering or
    unregistering a plugin makes new implementation objects, so a new key: the order is worked
    out again. A refusal raises, and is not cached."""
    pm = plugins.plugin_manager()
    wrappers = [i.plugin_name for i in impls if i.wrapper or i.hookwrapper]
    if wrappers:
        hook = getattr(pm.hook, hook_name)
        raise PluginError(
            f"plugin {', '.join(map(repr, wrappers))}: {hook.name}({', '.join(hook.spec.argnames)}) is a "
            f"wrapper (wrapper=True or hookwrapper=True), which event hooks do not support: the engine "
            f"calls them one by one. Use a plain @stagewise.hookimpl; tryfirst=True or trylast=True "
            f"has it called first or last")
    registered = {name: i for i, (name, _) in enumerate(pm.list_name_plugin())}
    sign = -1 if is_after else 1
    return tuple(sorted(impls, key=lambda i: (-i.tryfirst + i.trylast, sign * registered[i.plugin_name])))


def check_event_hooks() -> None:
    """Refuse unsupported event hook implementations before a run writes anything."""
    for event in Event:
        event_hookimpls(event)
