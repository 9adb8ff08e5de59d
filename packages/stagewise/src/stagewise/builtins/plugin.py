"""Registers core's built-ins through the same hooks as every plugin.

Targets are lazy ``"module:attribute"`` strings so that listing plugins imports no torch.
"""

from __future__ import annotations

from importlib.resources import files

from stagewise.hookspecs import hookimpl


@hookimpl
def stagewise_register_stages(register):
    register("stagewise.builtins.train:TrainStage", "stagewise.train")
    register("stagewise.builtins.evaluate:EvaluateStage", "stagewise.evaluate")


@hookimpl
def stagewise_register_losses(register):
    register("stagewise.builtins.losses:CrossEntropy", "stagewise.cross_entropy")
    register("stagewise.builtins.losses:MSE", "stagewise.mse")


@hookimpl
def stagewise_register_models(register):
    register("stagewise.nn.transformer:TransformerLM", "stagewise.transformer")
    register("stagewise.nn.mlp:MLP", "stagewise.mlp")


@hookimpl
def stagewise_register_datasets(register):
    register("stagewise.data.text:TextCorpus", "stagewise.text")
    register("stagewise.data.loaders:CSVDataset", "stagewise.csv")
    register("stagewise.data.loaders:JSONLDataset", "stagewise.jsonl")
    register("stagewise.data.loaders:IDXDataset", "stagewise.idx")
    register("stagewise.data.loaders:NPZDataset", "stagewise.npz")


@hookimpl
def stagewise_register_recipes(register):
    register(files("stagewise.recipes") / "demo.toml", "stagewise.demo")
