"""stagewise: staged neural-network training with pluggable stages, routers and losses.

This module is the public API. It imports nothing heavy: names that need torch
(``Stage``, ``Router``, ``Loss``, ``run_recipe``, ...) are loaded on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from stagewise.errors import (
    CheckpointError,
    ConfigError,
    OptionError,
    PluginError,
    StagewiseError,
    TrainingError,
    UnknownNameError,
)
from stagewise.events import Event
from stagewise.hookspecs import hookimpl
from stagewise.lazy import lazy_attributes
from stagewise.plugins import get as _get
from stagewise.plugins import registries as _registries

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ConfigError", "DataSplits", "Event", "Loss", "LossSpec", "Needs", "OptionError",
    "PluginError", "Router", "RouterSpec", "Routing", "Stage", "StagewiseError", "State", "TrainStage",
    "TrainingError", "UnknownNameError", "__version__", "autocast", "check_options", "eval_mode", "forward_batch",
    "get_dataset", "get_datasets", "get_loss", "get_losses", "get_model", "get_models", "get_recipe", "get_recipes",
    "get_router", "get_routers", "get_stage", "get_stages", "hookimpl", "load_model", "load_recipe", "run_recipe",
]

# name -> module that defines it; imported on first attribute access (PEP 562)
_LAZY = {
    "Stage": "stagewise.stage",
    "TrainStage": "stagewise.builtins.train",
    "Router": "stagewise.router",
    "Routing": "stagewise.router",
    "Loss": "stagewise.loss",
    "Needs": "stagewise.loss",
    "State": "stagewise.engine.state",
    "DataSplits": "stagewise.data.splits",
    "load_recipe": "stagewise.recipe",
    "load_model": "stagewise.load",
    "LossSpec": "stagewise.specs",
    "RouterSpec": "stagewise.specs",
    "forward_batch": "stagewise.engine.objective",
    "check_options": "stagewise.schema",
    "eval_mode": "stagewise.engine.evaluate",
    "autocast": "stagewise.engine.precision",
    "run_recipe": "stagewise.engine.runner",
}


if TYPE_CHECKING:  # what the lazy names are, for type checkers (imported for real on first access)
    from stagewise.builtins.train import TrainStage
    from stagewise.data.splits import DataSplits
    from stagewise.engine.evaluate import eval_mode
    from stagewise.engine.objective import forward_batch
    from stagewise.engine.precision import autocast
    from stagewise.engine.runner import run_recipe
    from stagewise.engine.state import State
    from stagewise.load import load_model
    from stagewise.loss import Loss, Needs
    from stagewise.recipe import load_recipe
    from stagewise.router import Router, Routing
    from stagewise.schema import check_options
    from stagewise.specs import LossSpec, RouterSpec
    from stagewise.stage import Stage

__getattr__ = lazy_attributes(__name__, _LAZY)


def _all_of(kind: str) -> dict[str, Any]:
    return {name: _get(kind, name) for name in _registries()[kind].names()}


def get_stages() -> dict[str, Any]:
    """Every registered Stage class, by name."""
    return _all_of("stages")


def get_stage(name: str) -> Any:
    """The Stage class registered as ``name``; raises UnknownNameError listing the others."""
    return _get("stages", name)


def get_routers() -> dict[str, Any]:
    """Every registered Router class, by name."""
    return _all_of("routers")


def get_router(name: str) -> Any:
    """The Router class registered as ``name``."""
    return _get("routers", name)


def get_losses() -> dict[str, Any]:
    """Every registered Loss class, by name."""
    return _all_of("losses")


def get_loss(name: str) -> Any:
    """The Loss class registered as ``name``."""
    return _get("losses", name)


def get_models() -> dict[str, Any]:
    """Every registered model class, by name."""
    return _all_of("models")


def get_model(name: str) -> Any:
    """The model class registered as ``name``."""
    return _get("models", name)


def get_datasets() -> dict[str, Any]:
    """Every registered dataset class, by name."""
    return _all_of("datasets")


def get_dataset(name: str) -> Any:
    """The dataset class registered as ``name``."""
    return _get("datasets", name)


def get_recipes() -> dict[str, Any]:
    """Every registered recipe file, by name."""
    return _all_of("recipes")


def get_recipe(name: str) -> Any:
    """The path of the recipe registered as ``name``."""
    return _get("recipes", name)
