"""Built-in event plugin: TensorBoard scalars when ``[run] tensorboard = true``.

Runs on ``Event.AFTER_STEP`` (logged steps) and ``Event.AFTER_EPOCH``; writes to
``RUN_DIR/tensorboard/<checkpoint>/steps`` (tag ``<stage>/train/loss_step`` at the stage's step) and
``RUN_DIR/tensorboard/<checkpoint>/epochs`` (tags ``<stage>/KEY`` at the stage's 0-based epoch):
folders by the stage's checkpoint name, a safe folder name (the stage's name by default), tags by
the stage's name. Needs ``pip install stagewise[tensorboard]``.

One folder per stage and series, because TensorBoard purges by folder: a writer's first point
is written with ``purge_step`` at its step, so a resumed run, logging again what came after its
checkpoint, hides the points a killed run had logged from there on (each point shows once); the
stage's other series, counted in other units, and the other stages are left alone. Each event's points
are flushed as they are written, so that every point a checkpoint has seen is on disk with it. The run
directory closes the writers when the run ends, finished or failed; a stage's when it ends.
"""

from __future__ import annotations

from typing import Any

from stagewise.errors import ConfigError
from stagewise.hookspecs import hookimpl
from stagewise.install import install_command

# the open writers of each running run, by id(state), then by folder; the run directory closes
# them when the run ends, finished or failed, so a later state with a reused id never finds a stale writer
_writers: dict[int, dict[str, Any]] = {}


def _run_writers(state) -> dict[str, Any] | None:
    """The open writers of ``state``'s run by folder; None when it writes no TensorBoard scalars."""
    if not state.recipe.run.tensorboard or state.run_dir is None:
        return None
    key = id(state)
    if key not in _writers:
        _summary_writer()  # not installed: fail now, before training
        _writers[key] = {}
        state.run_dir.on_close(lambda: _close(_writers.pop(key)))
    return _writers[key]


def _summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ConfigError([f"run.tensorboard: TensorBoard is not installed; "
                           f"{install_command('stagewise', 'tensorboard')} or set tensorboard = false"]) from exc
    return SummaryWriter


def _folder(state, series: str) -> str:
    """``<stage>/<series>``: a checkpoint name is a safe folder name (a stage's name need not be)."""
    return f"{state.recipe.stages[state.stage_index].checkpoint}/{series}"


def _add_scalars(state, series: str, values: dict[str, float], step: int) -> None:
    writers = _run_writers(state)
    if writers is None or not values:
        return
    folder = _folder(state, series)
    if folder not in writers:  # purge_step: TensorBoard hides this folder's earlier points from ``step`` on
        writers[folder] = _summary_writer()(str(state.run_dir.path / "tensorboard" / folder), purge_step=step)
    for tag, value in values.items():
        writers[folder].add_scalar(tag, value, step)
    # on disk before the next checkpoint, as metrics.jsonl's lines are: a run killed after it resumes past
    # this point, so a point still queued (or buffered until flushed) would be lost for good
    writers[folder].flush()


def _close(writers: dict[str, Any]) -> None:
    while writers:
        writers.popitem()[1].close()


@hookimpl
def stagewise_before_run(state):
    _run_writers(state)  # fail before training, not after it


@hookimpl
def stagewise_after_step(state, loss):
    if state.step % state.recipe.run.log_every_n_steps == 0:
        _add_scalars(state, "steps", {f"{state.stage_name}/train/loss_step": loss}, state.step)


@hookimpl
def stagewise_after_epoch(state, metrics):
    _add_scalars(state, "epochs", {f"{state.stage_name}/{key}": value for key, value in metrics.items()
                                   if isinstance(value, int | float) and not isinstance(value, bool)}, state.epoch)


@hookimpl
def stagewise_after_stage(state):
    writers = _writers.get(id(state), {})
    for series in ("steps", "epochs"):  # the stage is over: its points are on disk, its threads end
        writer = writers.pop(_folder(state, series), None)
        if writer is not None:
            writer.close()
