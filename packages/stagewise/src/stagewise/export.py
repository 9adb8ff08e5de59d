"""Export a trained model to a numpy-only format: one ``.npz`` of arrays plus JSON metadata.

The file loads with ``numpy.load(path, allow_pickle=False)`` anywhere, no torch needed:
arrays are the model's state dict (names as keys); ``__meta__`` holds a JSON string with the
model name, its options and the stage it came from.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from stagewise.engine.checkpoint import atomic_write_bytes, load_checkpoint
from stagewise.engine.rundir import file_in_the_way
from stagewise.errors import CheckpointError

EXPORT_KEYS = ("model", "recipe", "model_options", "stage_name")
FORMAT = "stagewise-npz-1"  # __meta__["format"]: marks a file export_npz wrote


def export_npz(checkpoint: Path, out: Path) -> dict[str, int]:
    """Write the checkpoint's model weights to ``out``; returns array count and parameter count.

    ``out`` may replace an earlier export, never another file (the checkpoint itself, a recipe)."""
    out = Path(out)
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
    saved = load_checkpoint(Path(checkpoint), EXPORT_KEYS)
    arrays = {name: tensor.detach().cpu().float().numpy() if tensor.is_floating_point() else tensor.cpu().numpy()
              for name, tensor in saved["model"].items()}
    if "__meta__" in arrays:
        raise CheckpointError(f"{checkpoint}: a parameter is named '__meta__', which the format reserves")
    meta = {"model": saved["recipe"]["model"].get("use"), "model_options": saved["model_options"],
            "stage": saved["stage_name"], "format": FORMAT}
    counts = {"arrays": len(arrays), "parameters": int(sum(a.size for a in arrays.values()))}
    arrays["__meta__"] = np.array(json.dumps(meta))
    atomic_write_bytes(out, lambda f: np.savez(f, **arrays))
    return counts


def _is_export(path: Path) -> bool:
    """Whether ``path`` is a file :func:`export_npz` wrote (which a new export may replace)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return json.loads(str(data["__meta__"])).get("format") == FORMAT
    except Exception:  # not an npz, no __meta__, not JSON: not an export
        return False


def load_npz(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """Read an exported file back: (arrays by name, metadata)."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files if k != "__meta__"}
        meta = json.loads(str(data["__meta__"]))
    return arrays, meta
