"""Which stage, term and plugin a bug that broke a stage came from, for a note on its traceback.

The traceback is for the plugin's author; the note tells a user whom to report it to. It is
worked out from the traceback once the stage has failed, so a step costs nothing for it.
"""

from __future__ import annotations

import traceback
from typing import TYPE_CHECKING

from stagewise import plugins
from stagewise.loss import Loss
from stagewise.router import Router

if TYPE_CHECKING:
    from types import FrameType

    from stagewise.specs import StageSpec


def failure_note(exc: BaseException, spec: StageSpec) -> str:
    """E.g. "in stage 'main' (koopman.operator term of stagewise.train), from stagewise-koopman 0.1.0:
    report it to that plugin"; without the plugin when every frame of ``exc`` is core's or Python's."""
    frames = [frame for frame, _ in traceback.walk_tb(exc.__traceback__)]
    component = _innermost_component(frames)
    note = f"in stage {spec.name!r} ({spec.use if component is None else f'{component} of {spec.use}'})"
    plugin = next((info for info in map(_plugin_of, reversed(frames)) if info is not None), None)
    if plugin is not None:
        note += f", from {plugin.distribution} {plugin.version}: report it to that plugin"
    return note


def _innermost_component(frames: list[FrameType]) -> str | None:
    """The loss term or router whose method the innermost of ``frames`` ran in, e.g. "koopman.operator term"."""
    for frame in reversed(frames):
        owner = frame.f_locals.get("self")
        if isinstance(owner, Loss | Router):
            return f"{owner.name} {'term' if isinstance(owner, Loss) else 'router'}"
    return None


def _plugin_of(frame: FrameType) -> plugins.PluginInfo | None:
    return plugins.third_party_plugin_of(frame.f_globals.get("__name__", ""))
