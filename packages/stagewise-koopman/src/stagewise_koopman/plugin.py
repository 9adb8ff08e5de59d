"""Registers stagewise-koopman's components and event hooks; imports nothing heavy.

Components are lazy ``"module:Class"`` strings; the event hooks import their module only in
runs whose current stage has loss terms (torch is loaded by then).
"""

from __future__ import annotations

from importlib.resources import files

import stagewise


@stagewise.hookimpl
def stagewise_register_losses(register):
    register("stagewise_koopman.loss:KoopmanOperator", "koopman.operator")


@stagewise.hookimpl
def stagewise_register_stages(register):
    register("stagewise_koopman.stages:ForwardEval", "koopman.forward_eval")
    register("stagewise_koopman.stages:Linearity", "koopman.linearity")


@stagewise.hookimpl
def stagewise_register_recipes(register):
    recipes = files("stagewise_koopman") / "recipes"
    register(recipes / "hybrid.toml", "koopman.hybrid")
    register(recipes / "baseline.toml", "koopman.baseline")


@stagewise.hookimpl
def stagewise_after_step(state, loss):
    if state.terms:
        from stagewise_koopman import events

        events.after_step(state, loss)


@stagewise.hookimpl
def stagewise_after_epoch(state, metrics):
    if state.terms:
        from stagewise_koopman import events

        events.after_epoch(state, metrics)


@stagewise.hookimpl
def stagewise_after_stage(state):
    if state.terms:
        from stagewise_koopman import events

        events.after_stage(state)
