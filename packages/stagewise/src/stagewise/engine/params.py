"""Which parameters a stage trains: globs over parameter names. Freezing = out of the optimizer."""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

import torch

from stagewise.engine.checkpoint import rng_state, set_rng_state

if TYPE_CHECKING:
    from stagewise.data.splits import DataSplits
    from stagewise.recipe import Recipe


def select_parameters(model: torch.nn.Module, train: list[str], freeze: list[str],
                      where: str, recipe: Recipe) -> list[tuple[str, torch.nn.Parameter]]:
    """Mark parameters matching ``train`` and not ``freeze`` trainable; freeze the rest.

    Every glob must match at least one parameter, so a typo cannot silently freeze a model; a
    problem is the ``recipe``'s error, marked when ``--set`` gave the glob.
    """
    problems = glob_problems([n for n, _ in model.named_parameters()], train, freeze, where)
    if problems:
        raise recipe.error(problems)
    selected = []
    for name, param in model.named_parameters():
        trainable = _trains(name, train, freeze)
        param.requires_grad_(trainable)
        if trainable:
            selected.append((name, param))
    if not selected:
        raise recipe.error([f"{where}: train/freeze leave no parameter to train"])
    return selected


def glob_problems(names: list[str], train: list[str], freeze: list[str], where: str) -> list[str]:
    """One problem per ``train``/``freeze`` glob that matches none of ``names``, and one if
    together they leave nothing to train."""
    problems = [f"{where}.{key}: {glob!r} matches no parameter; names look like: {', '.join(names[:6])}"
                for key, globs in (("train", train), ("freeze", freeze)) for glob in globs
                if not any(fnmatchcase(n, glob) for n in names)]
    if names and not problems and not any(_trains(n, train, freeze) for n in names):
        problems.append(f"{where}: train/freeze leave no parameter to train (train = {train}, freeze = {freeze})")
    return problems


def _trains(name: str, train: list[str], freeze: list[str]) -> bool:
    return any(fnmatchcase(name, g) for g in train) and not any(fnmatchcase(name, g) for g in freeze)


def parameter_names_at(recipe: Recipe, index: int, data: DataSplits) -> list[str] | None:
    """The model's parameter names while stage ``index`` runs (after every ``grow`` up to it).

    The model is built on the meta device (no memory, no initialisation work) and the RNG is
    put back after, so that checking a recipe moves no number. None when it cannot be built
    there: the run's own build of the model then reports what is wrong.
    """
    saved = rng_state()
    try:
        with torch.device("meta"):
            model = recipe.model.component().from_recipe(recipe.model_options_at(index), data)
        return [n for n, _ in model.named_parameters()]
    except Exception:  # a bad option or a model meta cannot build: reported where it is built for real
        return None
    finally:
        set_rng_state(saved)
