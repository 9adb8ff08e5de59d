"""Hook specifications: the whole contract between stagewise and its plugins.

A plugin is a module (named by an entry point in the group ``stagewise``) holding functions
marked ``@stagewise.hookimpl`` whose names match the specs below. An implementation may accept
any subset of a spec's arguments, so new arguments never break existing plugins.

Register hooks hand the plugin a ``register(obj, name=None)`` callback. ``obj`` is the class
(or a lazy ``"module:attribute"`` string, so that listing plugins imports nothing heavy) and
``name`` defaults to ``obj.name``. Names are namespaced ``<plugin>.<thing>``.

Event hooks fire around the engine's loop (see :class:`stagewise.events.Event`). "before"
hooks run in registration order, "after" hooks in reverse, so a plugin can undo what it did.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import argparse

    from stagewise.engine.state import State
    from stagewise.stage import Stage

hookspec = pluggy.HookspecMarker("stagewise")
hookimpl = pluggy.HookimplMarker("stagewise")

Register = Callable[..., None]


# --- registration -------------------------------------------------------------------------


@hookspec
def stagewise_register_stages(register: Register) -> None:
    """Register Stage classes that recipes name in ``[[stages]] use = ...``.

    :param register: call ``register(stage_cls, name=None)`` once per Stage subclass; the
        class's ``Options`` dataclass defines the stage's recipe keys.

    .. versionadded:: 0.1
    """


@hookspec
def stagewise_register_routers(register: Register) -> None:
    """Register Router classes that stages name in ``router = { use = ... }``.

    :param register: call ``register(router_cls, name=None)`` once per Router subclass.

    .. versionadded:: 0.1
    """


@hookspec
def stagewise_register_losses(register: Register) -> None:
    """Register Loss classes that stages name in ``losses = [{ use = ... }]``.

    :param register: call ``register(loss_cls, name=None)`` once per Loss subclass.

    .. versionadded:: 0.1
    """


@hookspec
def stagewise_register_models(register: Register) -> None:
    """Register model classes that recipes name in ``[model] use = ...``.

    A model class has an ``Options`` dataclass and a classmethod
    ``from_recipe(options, data) -> torch.nn.Module``.

    :param register: call ``register(model_cls, name=None)`` once per model.

    .. versionadded:: 0.1
    """


@hookspec
def stagewise_register_datasets(register: Register) -> None:
    """Register dataset classes that recipes name in ``[data] use = ...``.

    A dataset class has an ``Options`` dataclass and a classmethod
    ``from_recipe(options, *, seed) -> stagewise.data.DataSplits``.

    :param register: call ``register(dataset_cls, name=None)`` once per dataset.

    .. versionadded:: 0.1
    """


@hookspec
def stagewise_register_recipes(register: Register) -> None:
    """Register named recipe files that ``stagewise run NAME`` can run.

    :param register: call ``register(path, name)``; ``path`` is a TOML file (a ``str``,
        ``pathlib.Path`` or ``importlib.resources`` traversable).

    .. versionadded:: 0.1
    """


@hookspec
def stagewise_register_commands(cli: argparse._SubParsersAction) -> None:
    """Add subcommands to the ``stagewise`` command line.

    Call ``parser = cli.add_parser(name, help=...)``, add arguments, then
    ``parser.set_defaults(handler=fn)``; ``fn(args) -> int`` returns the exit code.

    :param cli: the ``argparse`` subparsers object of the ``stagewise`` command.

    .. versionadded:: 0.1
    """


# --- run events ---------------------------------------------------------------------------


@hookspec
def stagewise_before_run(state: State) -> None:
    """Called once before the first stage runs (also when resuming).

    :param state: the run's :class:`~stagewise.engine.state.State`.

    .. versionadded:: 0.1
    """


@hookspec
def stagewise_after_run(state: State, metrics: dict[str, Any]) -> None:
    """Called once after the last stage, before ``summary.json`` is final.

    :param state: the run's state.
    :param metrics: the run's final metrics (the summary's ``metrics``).

    .. versionadded:: 0.1
    """


@hookspec
def stagewise_before_stage(state: State, stage: Stage) -> None:
    """Called before each stage starts (``state.stage_index`` is set).

    A stage a resumed run continues mid-way fires it again, with ``state.resume`` set to the
    checkpoint; stages the run had finished do not fire.

    :param state: the run's state.
    :param stage: the stage about to run.

    .. versionadded:: 0.1
    """


@hookspec
def stagewise_after_stage(state: State, stage: Stage, metrics: dict[str, Any]) -> None:
    """Called after each stage has finished, just before its checkpoint is written.

    :param state: the run's state.
    :param stage: the stage that ran.
    :param metrics: the metrics the stage reported.

    .. versionadded:: 0.1
    """


@hookspec
def stagewise_before_epoch(state: State) -> None:
    """Called at the start of each training epoch (``state.epoch`` is set).

    :param state: the run's state.

    .. versionadded:: 0.1
    """


@hookspec
def stagewise_after_epoch(state: State, metrics: dict[str, Any]) -> None:
    """Called after each training epoch and its evaluation, before the epoch's checkpoint.

    :param state: the run's state.
    :param metrics: the epoch's logged metrics (``train/...`` and ``val/...``).

    .. versionadded:: 0.1
    """


@hookspec
def stagewise_before_step(state: State, batch: dict[str, Any]) -> None:
    """Called before each optimizer step's forward pass. Keep it cheap: it is on the hot path.

    :param state: the run's state.
    :param batch: the batch about to be used (on the run's device); with ``accumulate_batches`` > 1
        the first of the step's batches: the hook fires once per optimizer step.

    .. versionadded:: 0.1
    """


@hookspec
def stagewise_after_step(state: State, loss: float) -> None:
    """Called after each optimizer step. Keep it cheap: it is on the hot path.

    :param state: the run's state (``state.step`` already counts this step).
    :param loss: the step's total loss as a Python float (non-finite if the step was skipped); with
        ``accumulate_batches`` > 1, the mean over all the step's examples.

    .. versionadded:: 0.1
    """
