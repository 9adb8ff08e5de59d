"""Which parameters a stage trains: globs over parameter names. Freezing = out of the optimizer."""

from __future__ import annotations

from fnmatch import fnmatchcase

import torch

from stagewise.errors import ConfigError


def select_parameters(model: torch.nn.Module, train: list[str], freeze: list[str],
                      where: str) -> list[tuple[str, torch.nn.Parameter]]:
    """Mark parameters matching ``train`` and not ``freeze`` trainable; freeze the rest.

    Every glob must match at least one parameter, so a typo cannot silently freeze a model.
    """
    names = [n for n, _ in model.named_parameters()]
    problems = [f"{where}.{key}: {glob!r} matches no parameter; names look like: {', '.join(names[:6])}"
                for key, globs in (("train", train), ("freeze", freeze)) for glob in globs
                if not any(fnmatchcase(n, glob) for n in names)]
    if problems:
        raise ConfigError(problems)
    selected = []
    for name, param in model.named_parameters():
        trainable = any(fnmatchcase(name, g) for g in train) and not any(fnmatchcase(name, g) for g in freeze)
        param.requires_grad_(trainable)
        if trainable:
            selected.append((name, param))
    if not selected:
        raise ConfigError([f"{where}: train/freeze leave no parameter to train"])
    return selected
