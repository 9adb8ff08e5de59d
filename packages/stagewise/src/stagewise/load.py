"""A trained model back in Python, from its run directory, one of its checkpoints or an export."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stagewise.data.splits import DataSplits
from stagewise.engine.checkpoint import load_checkpoint, newer_format, newer_format_message
from stagewise.engine.failures import noted
from stagewise.errors import CheckpointError
from stagewise.export import FORMAT, load_npz
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
    checkpoint; a checkpoint file such as ``RUN_DIR/checkpoints/phase1.pt``; or an ``.npz`` that
    ``stagewise export`` wrote), in eval mode.

    It is built as the run built it: the recipe's model with the checkpoint's options (as a
    ``grow`` left them) and the facts the data gave it (e.g. ``vocab_size``). An export's weights,
    stored as float32, go to each parameter's own dtype: exact for float32, bfloat16 and float16
    models, rounded to float32 for a float64 one. Plugins' artifacts are not loaded (an export's
    are in ``stagewise.export.load_npz(path)[1]["artifacts"]``)."""
    path = Path(source).expanduser()
    saved = _read_export(path) if path.suffix == ".npz" and not path.is_dir() else _read_checkpoint(path)
    with noted(f"rebuilding the model of {saved.file}", saved.use):  # the model's plugin code
        model = _build(saved)
        _load_weights(model, saved)
    if saved.part_way is not None:  # a stopped run's last.pt (or its export): not a trained model yet
        warnings.warn(saved.part_way, stacklevel=2)
    return model.to(device).eval()


@dataclass(frozen=True)
class _Saved:
    """What a model is rebuilt from, read from a checkpoint or an export."""

    file: Path
    use: str
    options: dict[str, Any]
    data_info: dict[str, Any]
    weights: dict[str, torch.Tensor]
    part_way: str | None  # the warning for weights written part-way through a stage; None: a finished stage's


def _read_checkpoint(source: Path) -> _Saved:
    """A run directory's last checkpoint or a checkpoint file."""
    checkpoint = checkpoint_of(source)
    saved = load_checkpoint(checkpoint, LOAD_KEYS)
    if "data_info" not in saved:
        raise CheckpointError(f"{checkpoint}: written by a stagewise that did not keep the data's facts the model "
                              f"is built from (e.g. vocab_size); run the recipe again to load its model")
    part_way = None
    if saved.get("stage_done") is False:
        part_way = f"{_part_way(checkpoint, saved.get('stage_name'))}; {part_way_advice(checkpoint, 'load')}"
    return _Saved(checkpoint, saved["recipe"]["model"]["use"], saved["model_options"], saved["data_info"],
                  saved["model"], part_way)


def _read_export(export: Path) -> _Saved:
    """An ``.npz`` that :func:`stagewise.export.export_npz` wrote (read with ``allow_pickle=False``)."""
    arrays, meta = load_npz(export)
    if newer_format(meta.get("format"), FORMAT):
        raise CheckpointError(newer_format_message(export, meta["format"], FORMAT, None))
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{export}: an .npz that stagewise export did not write (its __meta__ has no "
                              f"format {FORMAT!r}); give a file stagewise export wrote, a run directory or a "
                              f".pt checkpoint")
    if "data_info" not in meta:
        raise CheckpointError(f"{export}: exported by a stagewise that did not keep the data's facts the model "
                              f"is built from (e.g. vocab_size); export the run's checkpoint again "
                              f"(stagewise export RUN_DIR {export.name}) or load the checkpoint itself")
    part_way = None
    if meta.get("stage_done") is False:
        part_way = (f"{_part_way(export, meta.get('stage'))}; export a finished stage's checkpoint "
                    f"(RUN_DIR/checkpoints/<stage>.pt) for its weights, or resume the run if none has finished "
                    f"(stagewise run RECIPE --resume RUN_DIR)")
    weights = {name: torch.tensor(array) for name, array in arrays.items()}
    return _Saved(export, meta["model"], meta["model_options"], meta["data_info"], weights, part_way)


def _part_way(file: Path, stage: str | None) -> str:
    """The warning's first half, for a checkpoint and an export alike."""
    return f"{file} was written part-way through stage {stage!r}, so the model has its weights at that point"


def part_way_advice(checkpoint: Path, verb: str) -> str:
    """Where a finished stage's weights are, beside a checkpoint written part-way through a stage: ``verb``
    (export, load) one of the finished stages' checkpoints, or resume the run if none has finished."""
    finished = sorted(p.name for p in checkpoint.parent.glob("*.pt") if p != checkpoint and p.name != "last.pt")
    if finished:
        return f"{verb} one of {', '.join(finished)} in {checkpoint.parent} for a finished stage's"
    return "no stage has finished yet: resume the run (stagewise run RECIPE --resume RUN_DIR) to train it further"


def _build(saved: _Saved) -> torch.nn.Module:
    problems: list[str] = []
    spec = ModelSpec.from_table({"use": saved.use, **saved.options}, "model", problems)  # its plugin must be installed
    if problems:
        raise CheckpointError(f"{saved.file}: cannot rebuild its model: {'; '.join(problems)}")
    return spec.component().from_recipe(spec.options, DataSplits({}, saved.data_info))


def _load_weights(model: torch.nn.Module, saved: _Saved) -> None:
    """``saved``'s weights into ``model``, each cast to its parameter's or buffer's dtype; a CheckpointError
    naming the first few names that do not fit (missing, unexpected, another shape)."""
    state = model.state_dict()
    misfits = {
        "missing": [name for name in state if name not in saved.weights],
        "unexpected": [name for name in saved.weights if name not in state],
        "of another shape": [f"{name} {tuple(tensor.shape)}, the model's {tuple(state[name].shape)}"
                             for name, tensor in saved.weights.items()
                             if name in state and tensor.shape != state[name].shape],
    }
    found = [f"{what}: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''} ({len(names)})"
             for what, names in misfits.items() if names]
    if found:
        raise CheckpointError(f"{saved.file}: its weights do not fit the model {saved.use} builds from its options "
                              f"({'; '.join(found)}); was it written with another version of the model's plugin? "
                              f"install that version, or give the file the run wrote")
    model.load_state_dict(saved.weights)


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
