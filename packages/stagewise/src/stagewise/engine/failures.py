"""Which stage, term, hook and plugin a bug in a run, a command or a model load came from, for a
note on its traceback.

The traceback is for the plugin's author; the note tells a user whom to report it to. It is
worked out from the traceback once the run has failed, so a step costs nothing for it. The module
imports no torch: the command line notes every command's bugs, ``stagewise plugins``'s too.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from stagewise import plugins
from stagewise.errors import StagewiseError

if TYPE_CHECKING:
    from types import FrameType

REPORT = "report it to that plugin"
_NOTED = "stagewise_failure_noted"  # set on a bug once noted: an outer noted (the command's) adds no second note


@contextmanager
def noted(where: str, use: str | None = None, passing: tuple[type[Exception], ...] = ()) -> Iterator[None]:
    """Add a :func:`failure_note` to a bug raised inside (a StagewiseError says what went wrong already;
    ``passing``: errors the caller reports itself), unless a noted nearer to the bug has (a stage's
    inside the command's)."""
    try:
        yield
    except StagewiseError:
        raise
    except Exception as exc:
        if not isinstance(exc, passing) and not getattr(exc, _NOTED, False):
            exc.add_note(failure_note(exc, where, use))
            setattr(exc, _NOTED, True)
        raise


def failure_note(exc: BaseException, where: str, use: str | None = None) -> str:
    """E.g. "in stage 'main' (koopman.operator term of stagewise.train), from stagewise-koopman 0.1.0:
    report it to that plugin": ``where`` the engine was, what it was calling there (see :func:`_calling`)
    and the plugin to blame (see :func:`_blamed_plugin`), left out when there is none."""
    frames = [frame for frame, _ in traceback.walk_tb(exc.__traceback__)]
    what = _calling(frames, use)
    note = where if what is None else f"{where} ({what})"
    plugin = _blamed_plugin(exc, frames)
    return note if plugin is None else f"{note}, from {plugin.distribution} {plugin.version}: {REPORT}"


def _blamed_plugin(exc: BaseException, frames: list[FrameType]) -> plugins.PluginInfo | None:
    """The third-party plugin with the innermost frame in ``frames``, None when every frame is core's
    or Python's. An OSError is the file system's answer to the code that asked: it is a plugin's
    only when no core frame lies inside the plugin's, so a path core was handling (a run directory,
    a data file, a checkpoint) stays the user's to fix."""
    for frame in reversed(frames):
        module = frame.f_globals.get("__name__", "")
        plugin = plugins.third_party_plugin_of(module)
        if plugin is not None:
            return plugin
        if isinstance(exc, OSError) and module.partition(".")[0] == "stagewise":
            return None
    return None


def blames_plugin(exc: BaseException) -> bool:
    """Whether a failure note on ``exc`` names a plugin to report it to."""
    return any(note.endswith(REPORT) for note in getattr(exc, "__notes__", ()))


def _calling(frames: list[FrameType], use: str | None) -> str | None:
    """The innermost event hook, loss term or router of ``frames``, e.g. "stagewise_after_stage hook of
    plugin 'tracker'" or "koopman.operator term of stagewise.train" (``use``: the component the engine
    called), else ``use``."""
    from stagewise.engine.state import State  # here, not above: they import torch
    from stagewise.loss import Loss
    from stagewise.router import Router

    for frame in reversed(frames):
        impl = frame.f_locals.get("impl") if frame.f_code is State.fire.__code__ else None
        if impl is not None:  # the engine was calling a plugin's event hook
            return f"{frame.f_locals['event'].hook_name} hook of plugin {impl.plugin_name!r}"
        owner = frame.f_locals.get("self")
        if isinstance(owner, Loss | Router):
            component = f"{owner.name} {'term' if isinstance(owner, Loss) else 'router'}"
            return component if use is None else f"{component} of {use}"
    return use
