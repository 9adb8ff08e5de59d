"""Registers the lego_ashem components with stagewise; imports nothing heavy."""

from __future__ import annotations

from importlib.resources import files

import stagewise

RECIPES = ("ashem", "seed_protocol", "baseline")


@stagewise.hookimpl
def stagewise_register_models(register):
    register("stagewise_lego_ashem.model:DeepSupervisionTransformer", "lego_ashem.deep_supervision_transformer")


@stagewise.hookimpl
def stagewise_register_routers(register):
    register("stagewise_lego_ashem.router:Confidence", "lego_ashem.confidence")


@stagewise.hookimpl
def stagewise_register_stages(register):
    register("stagewise_lego_ashem.stages:Mine", "lego_ashem.mine")
    register("stagewise_lego_ashem.stages:TrainUpperLayers", "lego_ashem.train_upper_layers")
    register("stagewise_lego_ashem.stages:TrainExitProbe", "lego_ashem.train_exit_probe")
    register("stagewise_lego_ashem.stages:EvaluateRouted", "lego_ashem.evaluate_routed")


@stagewise.hookimpl
def stagewise_register_recipes(register):
    for name in RECIPES:
        register(files("stagewise_lego_ashem") / "recipes" / f"{name}.toml", f"lego_ashem.{name}")
