"""Examples held as arrays: the dataset every array-shaped loader returns, and ``stagewise.npz``."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

from stagewise.data.files import existing_file
from stagewise.data.splits import DataError, DataSplits, check_fractions, default_splits, split_indices


class ArrayDataset(Dataset):
    """Item i is ``{"input": inputs[i], "target": targets[i]}``."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor):
        self.inputs = inputs  # (N, ...)
        self.targets = targets  # (N, ...)

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input": self.inputs[i], "target": self.targets[i]}


def to_tensor(array: np.ndarray) -> torch.Tensor:
    """Float arrays become float32 tensors; integer and bool ones int64 (labels, token ids)."""
    dtype = np.float32 if array.dtype.kind == "f" else np.int64
    return torch.from_numpy(np.ascontiguousarray(array, dtype=dtype))


def array_splits(inputs: np.ndarray, targets: np.ndarray, fractions: dict[str, float],
                 seed: int) -> DataSplits:
    """Shuffle the examples (first axis) with ``seed`` and cut them into splits by ``fractions``.

    info: ``input_shape`` and ``target_shape`` (of one example), ``examples`` (per split) and,
    for integer targets, ``num_classes`` (largest label + 1).
    """
    splits = {name: ArrayDataset(to_tensor(inputs[idx]), to_tensor(targets[idx]))
              for name, idx in split_indices(len(inputs), fractions, seed).items()}
    info = {"input_shape": list(inputs.shape[1:]), "target_shape": list(targets.shape[1:]),
            "examples": {name: len(dataset) for name, dataset in splits.items()}}
    if targets.dtype.kind in "biu":
        info["num_classes"] = int(targets.max()) + 1
    return DataSplits(splits, info)


@dataclass
class NpzOptions:
    """The recipe's ``[data]`` keys for ``stagewise.npz``."""

    path: str  # .npz file (numpy.savez); the first axis of each array indexes the examples
    input_key: str = "input"  # name of the array of inputs in the file
    target_key: str = "target"  # name of the array of targets in the file
    splits: dict[str, float] = field(default_factory=default_splits)  # split name -> fraction

    def __post_init__(self) -> None:
        check_fractions(self.splits)


class NpzArrays:
    """``stagewise.npz``: two arrays of a ``.npz`` file, e.g. trajectories and their targets.

    Float arrays become float32, integer and bool arrays int64.
    """

    name = "stagewise.npz"
    Options = NpzOptions

    @classmethod
    def from_recipe(cls, options: NpzOptions, *, seed: int) -> DataSplits:
        path = existing_file(options.path, "NPZ file")
        try:
            npz = np.load(path, allow_pickle=False)
        except (ValueError, OSError, zipfile.BadZipFile) as exc:
            raise DataError(f"{path} is not a readable .npz file ({exc}); write it with numpy.savez") from None
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise DataError(f"{path} holds a single array (.npy); save the inputs and targets "
                            f"together with numpy.savez(path, {options.input_key}=..., {options.target_key}=...)")
        with npz:
            arrays = {}
            for option, key in (("input_key", options.input_key), ("target_key", options.target_key)):
                if key not in npz.files:
                    raise DataError(f"{path} has no array {key!r} ({option}); its arrays are: "
                                    f"{', '.join(npz.files)}")
                array = npz[key]
                if array.ndim == 0 or array.dtype.kind not in "biuf":
                    raise DataError(f"{path}: array {key!r} has shape {array.shape} and dtype "
                                    f"{array.dtype}; it must be numeric with the examples on axis 0")
                arrays[key] = array
        inputs, targets = arrays[options.input_key], arrays[options.target_key]
        if len(inputs) != len(targets):
            raise DataError(f"{path}: {options.input_key!r} has {len(inputs)} examples (axis 0) but "
                            f"{options.target_key!r} has {len(targets)}; they must match")
        return array_splits(inputs, targets, options.splits, seed)
