"""Registers the example plugin's components with stagewise; imports nothing heavy.

Each component is named by a lazy ``"module:Class"`` string, so ``stagewise plugins`` lists
this plugin without importing torch; the class is imported the first time a recipe uses it.
"""

from __future__ import annotations

from importlib.resources import files

import stagewise


@stagewise.hookimpl
def stagewise_register_stages(register):
    register("stagewise_example.stages:MineHard", "example.mine_hard")
    register("stagewise_example.stages:TrainHard", "example.train_hard")


@stagewise.hookimpl
def stagewise_register_routers(register):
    register("stagewise_example.router:LossQuantile", "example.loss_quantile")


@stagewise.hookimpl
def stagewise_register_losses(register):
    register("stagewise_example.loss:EntropyBonus", "example.entropy_bonus")


@stagewise.hookimpl
def stagewise_register_recipes(register):
    register(files("stagewise_example") / "recipes" / "hard_examples.toml", "example.hard_examples")


@stagewise.hookimpl
def stagewise_register_commands(cli):
    from stagewise_example.commands import add_hello

    add_hello(cli)


@stagewise.hookimpl
def stagewise_after_epoch(state, metrics):
    # Event hooks fire in every run, so act only in the stages this plugin provides.
    if state.recipe.stages[state.stage_index].use.startswith("example."):
        state.log("example.epoch", train_loss=metrics.get("train/loss"))
