"""The points in the engine's loop where plugins can act.

The loop, with each event where it fires::

    BEFORE_RUN
    for stage in recipe.stages:              # skipped stages are those a resumed run finished
        BEFORE_STAGE
        stage.run(state):                    # a training stage, e.g. stagewise.train:
            for epoch in range(max_epochs):
                BEFORE_EPOCH
                for batches in train_loader:     # accumulate_batches of them a step (default 1)
                    BEFORE_STEP
                    for batch in batches:
                        outputs = forward(model, batch); loss = sum_i w_i(t) * L_i(outputs); backward
                    clip, optimizer.step(), scheduler.step()
                    AFTER_STEP
                    checkpoint every [run] checkpoint_every_n_steps steps (0: none mid-epoch);
                    once SIGTERM has asked the run to stop: checkpoint, stop (engine/signals.py)
                evaluate on the validation split, early stopping
                AFTER_EPOCH
                checkpoint (then stop, once SIGTERM has asked)
        AFTER_STAGE
        checkpoint the stage (then stop, once SIGTERM has asked, unless it was the last)
    AFTER_RUN

- ``BEFORE_RUN`` / ``AFTER_RUN``: once per run (``stagewise_before_run(state)``).
- ``BEFORE_STAGE`` / ``AFTER_STAGE``: around each stage.
- ``BEFORE_EPOCH`` / ``AFTER_EPOCH``: around each training epoch, evaluation included.
- ``BEFORE_STEP`` / ``AFTER_STEP``: around each optimizer step; on the hot path.

"before" hooks run in registration order, "after" hooks in reverse registration order.
"""

from __future__ import annotations

from enum import Enum


class Event(Enum):
    """An event of the engine's loop; its value is the hook name without ``stagewise_``."""

    BEFORE_RUN = "before_run"
    AFTER_RUN = "after_run"
    BEFORE_STAGE = "before_stage"
    AFTER_STAGE = "after_stage"
    BEFORE_EPOCH = "before_epoch"
    AFTER_EPOCH = "after_epoch"
    BEFORE_STEP = "before_step"
    AFTER_STEP = "after_step"

    @property
    def hook_name(self) -> str:
        return f"stagewise_{self.value}"

    @property
    def is_after(self) -> bool:
        return self.value.startswith("after_")
