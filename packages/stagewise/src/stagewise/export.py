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
from stagewise.errors import CheckpointError


def export_npz(checkpoint: Path, out: Path) -> dict[str, int]:
    """Write the checkpoint's model weights to ``out``; returns array count and parameter count."""
    if Path(out).is_dir():
        raise CheckpointError(f"{out} is a folder; give the file to write, e.g. {Path(out) / 'model.npz'}")
    saved = load_checkpoint(Path(checkpoint))
    arrays = {name: tensor.detach().cpu().float().numpy() if tensor.is_floating_point() else tensor.cpu().numpy()
              for name, tensor in saved["model"].items()}
    if "__meta__" in arrays:
        raise CheckpointError(f"{checkpoint}: a parameter is named '__meta__', which the format reserves")
    meta = {"model": saved["recipe"]["model"].get("use"), "model_options": saved["model_options"],
            "stage": saved["stage_name"], "format": "stagewise-npz-1"}
    counts = {"arrays": len(arrays), "parameters": int(sum(a.size for a in arrays.values()))}
    arrays["__meta__"] = np.array(json.dumps(meta))
    atomic_write_bytes(Path(out), lambda f: np.savez(f, **arrays))
    return counts


def load_npz(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """Read an exported file back: (arrays by name, metadata)."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files if k != "__meta__"}
        meta = json.loads(str(data["__meta__"]))
    return arrays, meta
