"""A trained model back in Python, from its run directory or one of its checkpoints."""

from __future__ import annotations

import warnings
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
    """A run directory's last checkpoint, or ``source`` itself when it is a checkpoint file; a
    CheckpointError saying what to give instead for an export or a folder without ``checkpoints/last.pt``."""
    path = Path(source).expanduser()
    if path.suffix == ".npz" and path.is_file():  # torch would call it a corrupt checkpoint
        raise CheckpointError(f"{path}: an export (.npz), not a checkpoint; give the run directory or one of its "
                              f"checkpoints/<stage>.pt (stagewise.export.load_npz reads an export)")
    if not path.is_dir():
        if not path.exists() and (error := _others_in(path, path.parent)):  # a misspelt stage name
            raise error
        return path
    last = path / "checkpoints" / "last.pt"
    if not last.exists():
        raise _no_last_checkpoint(path)
    return last


def _no_last_checkpoint(folder: Path) -> CheckpointError:
    """The error for a folder given as a run directory that has no last checkpoint, naming the
    checkpoint files it or its ``checkpoints/`` holds (e.g. ``RUN/checkpoints`` given for ``RUN``)."""
    last = folder / "checkpoints" / "last.pt"
    for where in (folder / "checkpoints", folder):
        if error := _others_in(last, where):
            return error
    return CheckpointError(f"{last}: checkpoint not found: {folder} is no run directory, or its run wrote no "
                           f"checkpoint yet; give a run directory or a .pt checkpoint file")


def _others_in(missing: Path, where: Path) -> CheckpointError | None:
    """The error for ``missing`` naming the checkpoint files ``where`` holds; None when it holds none."""
    found = sorted(p.name for p in where.glob("*.pt"))
    return CheckpointError(f"{missing}: checkpoint not found; give one of the checkpoint files in {where}: "
                           f"{', '.join(found)}") if found else None


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
    if saved.get("stage_done") is False:  # a stopped run's last.pt: not a trained model yet
        warnings.warn(f"{checkpoint} was written part-way through stage {saved.get('stage_name')!r}, so the model has "
                      f"its weights at that point; {part_way_advice(checkpoint, 'load')}", stacklevel=2)
    return model.to(device).eval()


def part_way_advice(checkpoint: Path, verb: str) -> str:
    """Where a finished stage's weights are, beside a checkpoint written part-way through a stage: ``verb``
    (export, load) one of the finished stages' checkpoints, or resume the run if none has finished."""
    finished = sorted(p.name for p in checkpoint.parent.glob("*.pt") if p != checkpoint and p.name != "last.pt")
    if finished:
        return f"{verb} one of {', '.join(finished)} in {checkpoint.parent} for a finished stage's"
    return "no stage has finished yet: resume the run (stagewise run RECIPE --resume RUN_DIR) to train it further"


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
