"""Built-in event plugin: TensorBoard scalars when ``[run] tensorboard = true``.

Runs on ``Event.AFTER_STEP`` (logged steps) and ``Event.AFTER_EPOCH``; writes to
``RUN_DIR/tensorboard/``, with a writer the run directory closes when the run ends. Needs
``pip install stagewise[tensorboard]``.
"""

from __future__ import annotations

from stagewise.errors import ConfigError
from stagewise.hookspecs import hookimpl
from stagewise.install import install_command

# the open writer of each running run, by id(state); the run directory closes it when the run
# ends, finished or failed, so a later state with a reused id never finds a stale writer
_writers: dict[int, object] = {}


def _writer(state):
    if not state.recipe.run.tensorboard or state.run_dir is None:
        return None
    key = id(state)
    if key not in _writers:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ConfigError([f"run.tensorboard: TensorBoard is not installed; "
                               f"{install_command('stagewise', 'tensorboard')} or set tensorboard = false"]) from exc
        _writers[key] = SummaryWriter(str(state.run_dir.path / "tensorboard"))
        state.run_dir.on_close(lambda: _writers.pop(key).close())
    return _writers[key]


@hookimpl
def stagewise_before_run(state):
    _writer(state)  # fail before training, not after it


@hookimpl
def stagewise_after_step(state, loss):
    writer = _writer(state)
    if writer is not None and state.step % state.recipe.run.log_every_n_steps == 0:
        writer.add_scalar(f"{state.stage_name}/train/loss_step", loss, state.step)


@hookimpl
def stagewise_after_epoch(state, metrics):
    writer = _writer(state)
    if writer is not None:
        for key, value in metrics.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                writer.add_scalar(f"{state.stage_name}/{key}", value, state.epoch)

