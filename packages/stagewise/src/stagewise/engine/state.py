"""The one object every stage, loss, router and event hook sees: the run's state."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from stagewise import plugins
from stagewise.events import Event

if TYPE_CHECKING:
    from stagewise.data.splits import DataSplits
    from stagewise.engine.distributed import DistInfo
    from stagewise.engine.guards import RateLimitedWarnings
    from stagewise.engine.rundir import RunDir
    from stagewise.recipe import Recipe


@dataclass
class State:
    """Everything a run holds. Stages read and change it; the engine checkpoints it.

    ``artifacts`` hold what a stage hands to later ones (a threshold, cached hidden states, a
    trained encoder's state dict); they must be tensors, numbers, strings, lists or dicts so
    checkpoints load with ``weights_only=True``.
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
    stage_index: int = 0
    stage_name: str = ""
    epoch: int = 0  # 0-based epoch within the current stage
    step: int = 0  # optimizer steps taken in the current stage
    epochs_run: int = 0  # epochs the current stage has completed
    target_model: torch.nn.Module | None = None  # EMA copy of the model, when a stage asks for one
    terms: dict[str, Any] = field(default_factory=dict)  # the training stage's loss terms, by name
    resume: dict[str, Any] | None = None  # the checkpoint a resumed stage continues from
    metrics: dict[str, Any] = field(default_factory=dict)  # final metrics so far, all stages
    stage_results: dict[str, Any] = field(default_factory=dict)  # summary.json "stages"

    @property
    def seed(self) -> int:
        return self.recipe.run.seed

    @property
    def is_main(self) -> bool:
        return self.dist.rank == 0

    def fire(self, event: Event, **kwargs: Any) -> None:
        """Call the hook for ``event``: "before" hooks in registration order, "after" reversed."""
        hook = getattr(plugins.plugin_manager().hook, event.hook_name)
        impls = hook.get_hookimpls()  # registration order
        if not impls:
            return
        plugins.trace(event.hook_name, impls)
        kwargs = {"state": self, **kwargs}
        for impl in (reversed(impls) if event.is_after else impls):
            impl.function(**{name: kwargs[name] for name in impl.argnames})

    def log(self, event: str, **values: Any) -> None:
        """Append one record to ``metrics.jsonl`` (main process only)."""
        if self.run_dir is not None:
            record = {"event": event, "stage": self.stage_name, "epoch": self.epoch, "step": self.step}
            self.run_dir.log({**record, **values})

    def batches(self, source: Any, *, train: bool = False, epoch: int = 0, start: int = 0,
                indices: list[int] | None = None, shard: bool = True):
        """Batches on the run's device of a split (by name) or of any map-style dataset (a cache).

        ``train=True`` shuffles with an order fixed by (seed, stage, epoch). Under ``torchrun``
        each global batch is split across processes (sum what you measure over ranks, e.g. with
        :func:`stagewise.engine.distributed.all_reduce_sums`); ``shard=False`` gives every
        process the whole source, for results every rank must hold alike (a cache, a
        calibration). ``start`` skips batches (resume); ``indices`` keeps only those examples
        (e.g. the hard ones). See :mod:`stagewise.engine.batches`.
        """
        from stagewise.engine.batches import iterate_batches

        return iterate_batches(self, source, train=train, epoch=epoch, start=start, indices=indices, shard=shard)

    def save_checkpoint(self, *, done: bool, extra: dict[str, Any] | None = None) -> None:
        """Write ``checkpoints/last.pt`` (and the stage's own checkpoint when it is ``done``)."""
        from stagewise.engine.checkpoint import checkpoint_bytes, write_checkpoint_bytes
        from stagewise.engine.distributed import barrier

        if self.run_dir is not None:
            data = checkpoint_bytes(self.checkpoint_payload(done, extra or {}))  # serialized once
            name = self.recipe.stages[self.stage_index].checkpoint if done else None
            for file in ([f"{name}.pt"] if name else []) + ["last.pt"]:
                write_checkpoint_bytes(self.run_dir.checkpoints / file, data)
        barrier(self.dist)

    def checkpoint_payload(self, done: bool, extra: dict[str, Any]) -> dict[str, Any]:
        from stagewise.engine.checkpoint import rng_state
        from stagewise.schema import as_table

        return {
            "recipe": self.recipe.table,
            "stage_index": self.stage_index,
            "stage_name": self.stage_name,
            "stage_done": done,
            "model": self.model.state_dict(),
            "model_options": as_table(self.model_options),
            "artifacts": self.artifacts,
            "metrics": self.metrics,
            "stage_results": self.stage_results,
            "rng": rng_state(),
            "metrics_lines": self.run_dir.lines if self.run_dir is not None else 0,
            **extra,
        }

    def print(self, message: str) -> None:
        if not self.quiet and self.is_main:
            print(message, flush=True)
