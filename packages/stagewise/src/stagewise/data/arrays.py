"""Examples held as arrays: the dataset every array-shaped loader returns, and ``.npz`` reading."""

from __future__ import annotations

import math
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from stagewise.data.batch import Batch
from stagewise.data.files import GZIP_MAGIC, existing_file
from stagewise.data.splits import DataError, DataSplits, split_indices


class ArrayDataset(Dataset):
    """Item i is ``{"input": inputs[i], "target": targets[i]}``.

    With ``scale``, the inputs are held as stored (e.g. uint8 pixels, a quarter of their float32 size) and an
    item's input is ``inputs[i] * scale`` in float32, converted as batches are drawn.
    """

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, scale: float | None = None):
        self.inputs = inputs  # (N, ...)
        self.targets = targets  # (N, ...)
        self.scale = None if scale is None else torch.tensor(scale, dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input": self._scaled(self.inputs[i]), "target": self.targets[i]}

    def __getitems__(self, indices: list[int]) -> Batch:
        """The batch of these items, collated, from one gather and one conversion per tensor."""
        rows = torch.tensor(indices, dtype=torch.int64)
        return Batch(input=self._scaled(self.inputs[rows]), target=self.targets[rows])

    def _scaled(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.scale is None:
            return inputs
        # a copy even of float32 inputs, which must not be scaled in place; bit for bit numpy's astype(float32) * scale
        return inputs.to(torch.float32, copy=True).mul_(self.scale)


PIECE_BYTES = 1 << 22  # of a split's examples, as read, converted into its tensor at a time


def split_tensor(array: np.ndarray, idx: np.ndarray, dtype: np.dtype, *, what: str, source: str) -> torch.Tensor:
    """``array[idx]`` as a tensor of ``dtype`` (:func:`held_dtype`), gathered a piece of examples at a time: the
    whole split in the file's type (float64 numbers) is never held beside its tensor. A value beyond float32's
    range is a DataError naming the example."""
    rows = max(1, PIECE_BYTES // max(1, array[0].nbytes))
    out = np.empty((len(idx), *array.shape[1:]), dtype=dtype)
    with np.errstate(over="ignore"):  # a float64 beyond float32's range becomes infinite: refused below
        for start in range(0, len(idx), rows):
            out[start:start + rows] = array[idx[start:start + rows]]  # float64 to float32 rounds as astype does
    overflowed = array.dtype.kind == "f" and array.dtype.itemsize > 4 and not (
        np.isfinite(out.min()) and np.isfinite(out.max()))  # no mask of the whole split; NaN spreads to both
    if overflowed:  # the source was checked finite
        bad = ~np.isfinite(out.reshape(len(out), -1)).all(axis=1)
        raise DataError(f"{source}: example {int(idx[bad].min())} (0-based, axis 0) of the {what} holds a number "
                        f"beyond float32's range (about ±3.4e38), which would train as infinity; scale the values "
                        f"down")
    return torch.from_numpy(out)


# integer types torch holds as they are, in no more bytes than float32
_COMPACT = tuple(map(np.dtype, (np.uint8, np.int8, np.int16, np.int32)))


def held_dtype(array: np.ndarray, *, scaled: bool = False) -> np.dtype:
    """What a split of ``array`` is held as: float32 from floats, int64 from integers and bools (labels, token
    ids); inputs scaled as batches are drawn keep a compact integer type (uint8 pixels) in native byte order,
    and are otherwise float32."""
    native = array.dtype.newbyteorder("=")
    if scaled and native in _COMPACT:
        return native
    return np.dtype(np.float32 if scaled or array.dtype.kind == "f" else np.int64)


def array_splits(inputs: np.ndarray, targets: np.ndarray, fractions: dict[str, float], seed: int,
                 *, source: str, scale: float | None = None) -> DataSplits:
    """Shuffle the examples (axis 0) with ``seed`` and cut them into splits by ``fractions``.

    ``source`` (the file) names where a problem is: inputs without a feature axis, a split left empty.
    With ``scale``, items' inputs are ``inputs * scale`` in float32, converted as batches are drawn, so that
    uint8 pixels are held at a byte each (:class:`ArrayDataset`); the caller checks that the product is finite.
    info: ``input_shape`` and ``target_shape`` (of one example), ``n_features`` (values per
    input), ``n_outputs`` (classes for integer targets: largest label + 1; else values per
    target) and ``examples`` (per split).
    """
    if inputs.ndim < 2:
        raise DataError(f"{source}: the inputs have shape {inputs.shape}, a single number per example; "
                        f"give them a feature axis, shape (examples, features), e.g. x[:, None]")
    for what, array in (("inputs", inputs), ("targets", targets)):
        if array.ndim > 1 and math.prod(array.shape[1:]) == 0:
            raise DataError(f"{source}: the {what} have shape {array.shape}, no values per example; "
                            f"every example needs at least one {what[:-1]} value")
        if array.dtype.kind == "f" and array.size and not np.isfinite(array).all():
            i = int(np.flatnonzero(~np.isfinite(array.reshape(len(array), -1)).all(axis=1))[0])
            raise DataError(f"{source}: example {i} (0-based, axis 0) of the {what} holds NaN or infinity; "
                            f"fill in or drop missing values (NaN and infinity cannot be trained on)")
    integer = targets.dtype.kind in "biu"
    held = held_dtype(inputs, scaled=scale is not None), held_dtype(targets)
    splits = {name: ArrayDataset(split_tensor(inputs, idx, held[0], what="inputs", source=source),
                                 split_tensor(targets, idx, held[1], what="targets", source=source), scale)
              for name, idx in split_indices(len(inputs), fractions, seed, source=source).items()}
    info = {
        "input_shape": list(inputs.shape[1:]),
        "target_shape": list(targets.shape[1:]),
        "n_features": math.prod(inputs.shape[1:]),
        "n_outputs": int(targets.max()) + 1 if integer else math.prod(targets.shape[1:]),
        "examples": {name: len(dataset) for name, dataset in splits.items()},
    }
    return DataSplits(splits, info)


def read_npz(path: str, input_key: str, target_key: str) -> tuple[np.ndarray, np.ndarray]:
    """The arrays ``input_key`` and ``target_key`` of a ``.npz`` file, examples on axis 0."""
    file = existing_file(path, "NPZ file")
    _check_npz_magic(file)
    try:
        npz = np.load(file, allow_pickle=False)
    # EOFError: an empty file; NotImplementedError: zipfile's refusal of a zip version it does not know
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, NotImplementedError) as exc:
        raise DataError(f"{file} is not a readable .npz file ({exc or 'it is empty'}); write it with "
                        f"numpy.savez") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise DataError(f"{file} holds a single array (.npy); save the inputs and targets together "
                        f"with numpy.savez(path, {input_key}=..., {target_key}=...)")
    arrays = []
    with npz:
        for option, key in (("input_key", input_key), ("target_key", target_key)):
            if key not in npz.files:
                raise DataError(f"{file} has no array {key!r} ({option}); its arrays are: "
                                f"{', '.join(npz.files) or '(none)'}")
            try:
                array = npz[key]
            except ValueError as exc:  # an object array: reading it would unpickle, which runs code
                raise DataError(f"{file}: array {key!r} ({option}) cannot be read: {exc}; save numeric "
                                f"arrays only, e.g. numpy.asarray(x, dtype=numpy.float32)") from None
            except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:  # a damaged member
                raise DataError(f"{file}: array {key!r} ({option}) is corrupt ({exc}); the file may be "
                                f"truncated or damaged, write it again with numpy.savez") from None
            except (NotImplementedError, RuntimeError) as exc:  # zipfile: a compression or flag it lacks, encryption
                raise DataError(f"{file}: array {key!r} ({option}) is stored in a way numpy cannot read ({exc}); "
                                f"write the file with numpy.savez or numpy.savez_compressed") from None
            if not isinstance(array, np.ndarray):  # a zip member that is not a .npy: numpy gives its bytes
                raise DataError(f"{file}: {key!r} ({option}) is not a numpy array (.npy) inside the file; "
                                f"write the file with numpy.savez")
            if array.ndim == 0 or array.dtype.kind not in "biuf":
                raise DataError(f"{file}: array {key!r} has shape {array.shape} and dtype {array.dtype}; "
                                f"it must be numeric with the examples on axis 0")
            arrays.append(array)
    inputs, targets = arrays
    if len(inputs) != len(targets):
        raise DataError(f"{file}: {input_key!r} has {len(inputs)} examples (axis 0) but {target_key!r} "
                        f"has {len(targets)}; they must match")
    return inputs, targets


# how a .npz (a zip: local file header, or the end record of an empty one) and a .npy file start
_NPZ_MAGICS = (b"PK\x03\x04", b"PK\x05\x06", b"\x93NUMPY")


def _check_npz_magic(file: Path) -> None:
    """DataError naming the file unless it starts as a .npz or .npy does: numpy would read any other
    file as a pickle and refuse it as "pickled data", which sends the user the wrong way."""
    with file.open("rb") as f:
        start = f.read(6)
    if any(start.startswith(magic) for magic in _NPZ_MAGICS) or not start:  # numpy names an empty file itself
        return
    if start.startswith(GZIP_MAGIC):
        raise DataError(f"{file} is gzip-compressed; decompress it (gunzip) and give the .npz (numpy.savez_compressed "
                        f"writes a smaller .npz that stagewise reads as it is)")
    raise DataError(f"{file} is not a .npz file: it starts with bytes {start[:4].hex(' ')}, not a zip archive's "
                    f"50 4b 03 04; write it with numpy.savez")
