"""A trained model back in Python, from its run directory or one of its checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from stagewise.data.splits import DataSplits
from stagewise.engine.checkpoint import load_checkpoint
from stagewise.engine.failures import noted
from stagewise.errors import CheckpointError
from stagewise.specs import ModelSpec

LOAD_KEYS = ("model", "recipe", "model_options")


def checkpoint_of(source: str | Path) -> Path:
    """A run directory's last checkpoint, or ``source`` itself when it is a checkpoint file."""
    path = Path(source).expanduser()
    return path / "checkpoints" / "last.pt" if path.is_dir() else path


def load_model(source: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The model a run trained, with the weights of ``source`` (a run directory: its last
    checkpoint; or a checkpoint file such as ``RUN_DIR/checkpoints/phase1.pt``), in eval mode.

    It is built as the run built it: the recipe's model with the checkpoint's options (as a
    ``grow`` left them) and the facts the data gave it (e.g. ``vocab_size``)."""
    checkpoint = checkpoint_of(source)
    saved = load_checkpoint(checkpoint, LOAD_KEYS)
    if "data_info" not in saved:
        raise CheckpointError(f"{checkpoint}: written by a stagewise that did not keep the data's facts the model "
                              f"is built from (e.g. vocab_size); run the recipe again to load its model")
    with noted(f"rebuilding the model of {checkpoint}", saved["recipe"]["model"]["use"]):  # the model's plugin code
        model = _build(checkpoint, saved)
        model.load_state_dict(saved["model"])
    return model.to(device).eval()


def _build(checkpoint: Path, saved: dict[str, Any]) -> torch.nn.Module:
    problems: list[str] = []
    table = {"use": saved["recipe"]["model"]["use"], **saved["model_options"]}
    spec = ModelSpec.from_table(table, "model", problems)  # the model's plugin must be installed
    if problems:
        raise CheckpointError(f"{checkpoint}: cannot rebuild its model: {'; '.join(problems)}")
    return spec.component().from_recipe(spec.options, DataSplits({}, saved["data_info"]))


def plain_info(info: dict[str, Any]) -> dict[str, Any]:
    """The entries of a dataset's ``info`` that a checkpoint can hold as plain values (numbers,
    strings, lists, dicts): what :func:`load_model` rebuilds the model from. Objects such as a
    vocabulary are left out (the run directory keeps that one as ``vocab.txt``)."""
    return {key: value for key, value in info.items() if _plain(value)}


def _plain(value: Any) -> bool:
    if isinstance(value, bool | int | float | str) or value is None:
        return True
    if isinstance(value, list | tuple):
        return all(_plain(v) for v in value)
    return isinstance(value, dict) and all(isinstance(k, str) and _plain(v) for k, v in value.items())
