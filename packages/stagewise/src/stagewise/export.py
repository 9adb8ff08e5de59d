"""Export a trained model to a numpy-only format: one ``.npz`` of arrays plus JSON metadata.

The file loads with ``numpy.load(path, allow_pickle=False)`` anywhere, no torch needed:
arrays are the model's state dict (names as keys); ``__meta__`` holds a JSON string with the
model name, its options, the stage it came from (``stage_done`` false: written part-way through
it, e.g. by an unfinished run) and the routers the run kept
(``state.keep_router``), so the exported model routes as the run did, and what the data gave the
model: ``data_info`` (e.g. ``vocab_size``) and a text run's vocabulary (``vocab``), so the file
alone turns ids into words. With torch, ``stagewise.load_model(path)`` rebuilds the model from
it (from ``model``, ``model_options`` and ``data_info``, as from the checkpoint), its weights in eval mode.

What plugins keep beside the model, the checkpoint's ``artifacts`` (e.g. ``koopman.operators``:
a trained Koopman term's φ, K, ψ), comes along: every tensor that is an artifact or a dict value
inside one, at any depth, is an array named ``artifacts/<name>/<key>/...`` (the path of dict
keys; a ``/`` or ``%`` inside a key written as ``%2F``, ``%25``; floating ones as float32, as the
weights), and the rest of each artifact, its plain values (numbers, strings, lists; a tensor
inside a list as a nested list), is ``__meta__["artifacts"]``. :func:`load_npz` puts the arrays
back in place, so ``meta["artifacts"]`` has the shape of the checkpoint's artifacts. ``exclude``
(``stagewise export --exclude-artifact NAME``) leaves artifacts out, e.g. ``lego_ashem.cache``,
the hidden states of a whole split, which the run needed for training. Exports written before
artifacts came along have no ``meta["artifacts"]``.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np
import torch

from stagewise.engine.atomic import atomic_write_bytes
from stagewise.engine.checkpoint import load_checkpoint
from stagewise.engine.rundir import file_in_the_way
from stagewise.errors import CheckpointError

EXPORT_KEYS = ("model", "recipe", "model_options", "stage_name")
FORMAT = "stagewise-npz-1"  # __meta__["format"]: marks a file export_npz wrote
ARTIFACTS = "artifacts/"  # the names of the artifacts' arrays start with it (no model parameter's may)


def export_npz(checkpoint: Path, out: Path, exclude: Sequence[str] = ()) -> dict[str, Any]:
    """Write the checkpoint's model weights and artifacts (but those named in ``exclude``, e.g. a
    large training cache) to ``out``; returns the model's array count and parameter count,
    ``artifacts`` (the names written), ``replaced`` (whether ``out`` was an earlier export) and
    ``part_way``, the stage the checkpoint was written part-way through (None: a finished stage's).

    ``out`` may replace an earlier export, never another file (the checkpoint itself, a recipe)."""
    out = Path(out)
    replaced = _check_out(out)
    saved = load_checkpoint(Path(checkpoint), EXPORT_KEYS)
    arrays = {name: _array(tensor) for name, tensor in saved["model"].items()}
    reserved = next((name for name in arrays if name == "__meta__" or name.startswith(ARTIFACTS)), None)
    if reserved is not None:
        raise CheckpointError(f"{checkpoint}: a parameter is named {reserved!r}, which the format reserves")
    meta = {"model": saved["recipe"]["model"].get("use"), "model_options": saved["model_options"],
            "stage": saved["stage_name"], "routers": _routers(saved.get("routers", {})), "format": FORMAT,
            **_data_meta(Path(checkpoint), saved)}
    if "stage_done" in saved:  # False: a run's last.pt written part-way through that stage
        meta["stage_done"] = bool(saved["stage_done"])
    counts = {"arrays": len(arrays), "parameters": int(sum(a.size for a in arrays.values()))}
    artifacts = _kept(checkpoint, saved.get("artifacts", {}), exclude)
    if "artifacts" in saved:  # every checkpoint a run writes
        meta["artifacts"] = _split(artifacts, ARTIFACTS, arrays)
    arrays["__meta__"] = np.array(json.dumps(meta))
    atomic_write_bytes(out, lambda f: np.savez(f, **arrays))  # type: ignore[arg-type]  # stubs: a key could be allow_pickle
    return {**counts, "artifacts": sorted(meta.get("artifacts", {})), "replaced": replaced,
            "part_way": saved["stage_name"] if meta.get("stage_done") is False else None}


def _check_out(out: Path) -> bool:
    """A CheckpointError saying what to give instead unless ``out`` names an ``.npz`` file that export may
    write: a new one, or an earlier export to replace (returns whether it is one), never another file."""
    if out.is_dir():
        raise CheckpointError(f"{out} is a folder; give the file to write, e.g. {out / 'model.npz'}")
    blocking = file_in_the_way(out.parent)
    if blocking is not None:
        raise CheckpointError(f"cannot write {out}: {blocking} is a file, not a folder; give a path in a folder")
    if out.exists() and not _is_export(out):
        raise CheckpointError(f"{out} exists and is not a stagewise export; export never overwrites other "
                              f"files: give a new file name (or remove {out} first)")
    if out.suffix != ".npz":  # numpy.load and every reader of the format expect the name
        raise CheckpointError(f"{out}: an export is an .npz file; give a name ending in .npz, "
                              f"e.g. {out.with_suffix('.npz')}")
    return out.exists()  # an earlier export (anything else was refused above)


def _kept(checkpoint: Path, artifacts: dict[str, Any], exclude: Sequence[str]) -> dict[str, Any]:
    """The artifacts but those named in ``exclude``, each of which the checkpoint must hold (a typo must
    not quietly export everything)."""
    unknown = sorted(set(exclude) - set(artifacts))
    if unknown:
        raise CheckpointError(f"{checkpoint}: holds no artifact named {', '.join(map(repr, unknown))} to leave "
                              f"out; it holds: {', '.join(sorted(artifacts)) or 'none'}")
    return {name: value for name, value in artifacts.items() if name not in exclude}


def _array(tensor: torch.Tensor) -> np.ndarray:
    """A tensor as numpy, floating ones as float32 (numpy has no bfloat16)."""
    return tensor.detach().cpu().float().numpy() if tensor.is_floating_point() else tensor.detach().cpu().numpy()


def _split(value: dict, prefix: str, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """``value`` without its tensors (those of its dicts, at any depth), which go into ``arrays``
    under ``prefix`` + the path of their keys; the rest as JSON values."""
    plain = {}
    for key, item in value.items():
        name = prefix + str(key).replace("%", "%25").replace("/", "%2F")  # "/" separates the levels
        if isinstance(item, torch.Tensor):
            arrays[name] = _array(item)
        else:
            plain[str(key)] = _split(item, name + "/", arrays) if isinstance(item, dict) else _json(item, _plain)
    return plain


def _json(value: Any, leaf: Callable[[Any], Any]) -> Any:
    """``value`` as JSON values: dicts (keys as strings) and lists walked, tuples as lists, every
    other value as ``leaf`` gives it."""
    if isinstance(value, dict):
        return {str(k): _json(v, leaf) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json(v, leaf) for v in value]
    return leaf(value)


def _plain(value: Any) -> Any:
    """An artifact's plain value: a tensor (inside a list) as a nested list."""
    return value.tolist() if isinstance(value, torch.Tensor) else value  # else bool, int, float, str, None


def _data_meta(checkpoint: Path, saved: dict[str, Any]) -> dict[str, Any]:
    """``data_info``: the data's facts the model was built from (absent from checkpoints older than
    that key); ``vocab``: the tokens of the run directory's vocab.txt, id i at index i (a checkpoint
    in RUN_DIR/checkpoints of a text run only), so a numpy-only consumer needs no second file."""
    meta = {"data_info": saved["data_info"]} if "data_info" in saved else {}
    vocab = checkpoint.parent.parent / "vocab.txt"
    if checkpoint.parent.name == "checkpoints" and vocab.is_file():
        try:
            meta["vocab"] = vocab.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as exc:  # the run wrote UTF-8: the file was damaged since
            raise CheckpointError(f"{vocab}: not the UTF-8 text the run wrote ({exc}), so the export cannot hold the "
                                  f"run's vocabulary; put back the file the run wrote") from None
    return meta


def _routers(routers: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's routers, name -> {"use", "options", "state"}, as JSON values (none: ``{}``)."""
    return {name: {"use": r["use"], "options": r["options"], "state": _json(r["state"], _float32)}
            for name, r in routers.items()}


def _float32(value: Any) -> Any:
    """A router's state value as JSON: tensors and arrays as (nested) lists, and every float rounded
    to float32, as torch compares float32 scores with a threshold: numpy, comparing float32 scores
    with the stored value (at float32 or float64), then routes exactly as torch did."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return (value.astype(np.float32) if value.dtype.kind == "f" else value).tolist()
    if isinstance(value, float | np.floating):
        return float(np.float32(value))
    if isinstance(value, np.generic):
        return value.item()
    return value  # bool, int, str, None


def _is_export(path: Path) -> bool:
    """Whether ``path`` is a file :func:`export_npz` wrote (which a new export may replace)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return json.loads(str(data["__meta__"])).get("format") == FORMAT
    except Exception:  # not an npz, no __meta__, not JSON: not an export
        return False


def load_npz(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """Read an exported file back: (the model's arrays by name, metadata), the artifacts' arrays
    in place in ``meta["artifacts"]``; a CheckpointError naming ``path`` when it is no such file."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files if k != "__meta__"}
            meta = json.loads(str(data["__meta__"]))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: export not found") from None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:  # truncated, not npz, no __meta__
        raise CheckpointError(f"{path}: not a file stagewise export wrote ({type(exc).__name__}: {exc}); "
                              f"export the checkpoint again") from None
    if not isinstance(meta, dict) or (any(n.startswith(ARTIFACTS) for n in arrays) and
                                      not isinstance(meta.get("artifacts"), dict)):
        raise CheckpointError(f"{path}: its __meta__ is not what stagewise export writes; export the checkpoint again")
    for name in [name for name in arrays if name.startswith(ARTIFACTS)]:
        *parents, key = (unquote(part) for part in name.removeprefix(ARTIFACTS).split("/"))
        node = meta["artifacts"]
        for parent in parents:
            node = node.setdefault(parent, {})
        node[key] = arrays.pop(name)
    return arrays, meta
