"""Checkpoints: written atomically (temp file + rename), read with ``weights_only=True``.

A checkpoint holds everything a resumed run needs to end with the numbers of an
uninterrupted one: model, optimizer, scheduler, loss terms, EMA target, RNG states, stage
index, loop position, router state and artifacts; and the versions of stagewise and its plugins
that wrote it, since other code may not continue it to those numbers.

Checkpoints are written by :func:`stagewise.engine.atomic.atomic_write_bytes`, as every file a run
writes. The RNG states a checkpoint saves and a resume puts back live here too (:func:`rng_state`,
:func:`set_rng_state`, :func:`seed_everything`).
"""

from __future__ import annotations

import io
import pickle
import random
import re
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Any, TypeGuard, cast

import numpy as np
import torch

from stagewise import __version__
from stagewise.engine.atomic import atomic_write_bytes
from stagewise.errors import CheckpointError

FORMAT = "stagewise-checkpoint-1"
# leaves a weights_only load reads (tensors aside); a value of another type is tried on its own
_PLAIN = (int, float, bool, str, bytes, complex, type(None), torch.Size, torch.dtype, torch.device)
# what every checkpoint holds (State.checkpoint_payload); a resumed run reads them all
RESUME_KEYS = ("recipe", "stage_index", "stage_name", "stage_done", "model", "model_options", "artifacts",
               "metrics", "stage_results", "rng", "metrics_lines")
# the type of each key a reader asks for, as a run writes it; a file of the right format with other
# contents (edited or crafted) is refused by name, not met as an AttributeError deep in a command
_KEY_TYPES: dict[str, type[Any]] = {
    "recipe": dict, "stage_index": int, "stage_name": str, "stage_done": bool, "model": dict, "model_options": dict,
    "artifacts": dict, "metrics": dict, "stage_results": dict, "rng": dict, "metrics_lines": int}


def write_checkpoint(payload: dict[str, Any], paths: list[Path]) -> None:
    """Write ``payload`` as the checkpoint at each of ``paths``, each atomically: ``torch.save``
    streams it straight into the first file, the others are copies of that file, so memory never
    holds a serialised copy of it (lego-ashem's cache: hundreds of MB at benchmark size)."""
    first, *others = paths
    atomic_write_bytes(first, lambda f: torch.save({"format": FORMAT, **payload}, f))
    for path in others:
        _copy_file(first, path)


def _copy_file(source: Path, path: Path) -> None:
    with source.open("rb") as src:
        atomic_write_bytes(path, lambda f: shutil.copyfileobj(src, f))


def unreadable(value: Any, where: str) -> list[str]:
    """Each part of ``value`` that ``torch.load(weights_only=True)`` would refuse, as ``where[key]
    (a type)``: a checkpoint holding one could be written but never resumed, exported or loaded."""
    if isinstance(value, torch.Tensor) or type(value) in _PLAIN:
        return []
    if type(value) in (dict, OrderedDict):
        return [p for k, v in value.items() for p in unreadable(k, f"{where} key {k!r}") +
                unreadable(v, f"{where}[{k!r}]")]
    if type(value) in (list, tuple, set):
        return [p for i, v in enumerate(value) for p in unreadable(v, f"{where}[{i}]")]
    kind = type(value)
    return [] if _loads_back(value) else [f"{where} (a {kind.__module__}.{kind.__qualname__})"]


def _loads_back(value: Any) -> bool:
    """Whether ``value``, of a type not in ``_PLAIN``, survives torch.save and a weights_only load."""
    buffer = io.BytesIO()
    try:
        torch.save(value, buffer)
        buffer.seek(0)
        torch.load(buffer, weights_only=True)
    except Exception:  # unpicklable, or refused by weights_only: either way no checkpoint could hold it
        return False
    return True


# for readers of a checkpoint (export, load_model, plugins' loaders); --resume passes advice of its own
_DAMAGED_ADVICE = ("Use another checkpoint of the run (checkpoints/<stage>.pt, one per finished stage), "
                   "or run the recipe again.")


def load_checkpoint(path: str | Path, keys: tuple[str, ...] = (), damaged_advice: str = _DAMAGED_ADVICE
                    ) -> dict[str, Any]:
    """The checkpoint at ``path``, read with ``weights_only=True``; CheckpointError unless it is a
    stagewise checkpoint holding every one of ``keys``. ``damaged_advice`` ends the error of a
    file that cannot be read (corrupt or truncated): what to do instead."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    payload = _torch_load(path, damaged_advice)
    found = payload.get("format") if isinstance(payload, dict) else None
    if newer_format(found, FORMAT):
        versions = payload.get("versions")  # the newer stagewise's own record, where it keeps one as this one does
        writer = versions.get("stagewise") if isinstance(versions, dict) else None
        raise CheckpointError(newer_format_message(path, found, FORMAT, writer))
    if found != FORMAT:
        raise CheckpointError(f"{path}: not a stagewise checkpoint (expected format {FORMAT!r})")
    missing = [key for key in keys if key not in payload]
    if missing:
        raise CheckpointError(f"{path}: an incomplete stagewise checkpoint: it lacks {', '.join(missing)}; "
                              f"use a checkpoint a stagewise run wrote")
    malformed = [key for key in keys if not _well_formed(key, payload[key])]
    if malformed:
        raise CheckpointError(f"{path}: a damaged stagewise checkpoint: what it holds under {', '.join(malformed)} "
                              f"is not what a run writes there; use a checkpoint a stagewise run wrote")
    return payload


def newer_format(found: Any, current: str) -> TypeGuard[str]:
    """Whether ``found`` names another version of the file format ``current`` ("stagewise-checkpoint-2"
    for "stagewise-checkpoint-1"): this stagewise writes and reads each format's first version, so
    any other was written by a newer stagewise."""
    return isinstance(found, str) and found != current and found.startswith(current.rpartition("-")[0] + "-")


def newer_format_message(path: Path, found: str, current: str, writer: str | None) -> str:
    """The refusal of a file in a newer stagewise's format ``found`` (``writer``: its version, where known)."""
    by = f"stagewise {writer}" if writer else "a newer stagewise"
    return (f"{path}: written by {by} in format {found!r}, which stagewise {__version__} cannot read (it reads "
            f"{current!r}); upgrade stagewise and its plugins to read it (pip install -U stagewise)")


def _torch_load(path: Path, damaged_advice: str) -> Any:
    """What ``torch.load(weights_only=True)`` reads from ``path``; a file it cannot read is a CheckpointError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, foreign file, objects weights_only refuses: all mean "not usable"
        refused = re.search(r"GLOBAL ([\w.]+)", str(exc)) if isinstance(exc, pickle.UnpicklingError) else None
        if refused:  # never loaded: unpickling it could run code
            raise CheckpointError(
                f"{path}: refused: the file holds Python objects (it refers to {refused[1]}) that only an "
                "unsafe load (pickle) could read, and unpickling can run code. Checkpoints are read with "
                "weights_only=True: use a checkpoint a stagewise run wrote."
            ) from None
        detail = ("not a file torch.save wrote" if isinstance(exc, pickle.UnpicklingError)  # torch's text: pages
                  else " ".join(str(exc).split()))  # one paragraph
        raise CheckpointError(
            f"{path}: the checkpoint is corrupt or truncated ({type(exc).__name__}: {detail}). {damaged_advice}"
        ) from exc


def _well_formed(key: str, value: Any) -> bool:
    """Whether ``value`` has the type a run writes under ``key``: the model's weights tensors, the
    recipe one naming its model (``[model] use``), which every reader of a checkpoint rebuilds."""
    kind = _KEY_TYPES.get(key, object)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        return False
    if key == "model":
        return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())
    if key == "recipe":  # compared with the recipe resumed with, its changes shown as TOML
        return _toml_data(value) and isinstance(value.get("model"), dict) and isinstance(value["model"].get("use"), str)
    return True


def _toml_data(value: Any) -> bool:
    """Whether ``value`` holds only what a recipe file can: tables, arrays, strings, numbers, booleans."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and _toml_data(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return all(_toml_data(v) for v in value)
    return isinstance(value, str | int | float)  # bool is an int


def rng_state() -> dict[str, Any]:
    """Every RNG the engine's randomness comes from, as tensors and plain values."""
    # numpy's stubs allow a dict too, which only a RandomState on another bit generator than MT19937 gives
    kind, keys, pos, has_gauss, gauss = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Put back what :func:`rng_state` took (CUDA's only where this machine has CUDA)."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(python_rng_state(state["python"]))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def python_rng_state(saved: Any) -> Any:
    """What ``random.setstate`` takes: the saved state with its lists (as a checkpoint may hold them) as tuples."""
    return tuple(python_rng_state(v) for v in saved) if isinstance(saved, list | tuple) else saved


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's RNGs (numpy takes seeds below 2**32 only)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
