"""``stagewise.idx``: images and labels in the IDX format of MNIST (gzip allowed).

An IDX file holds one array: two zero bytes, a type code, the number of dimensions d, then d
big-endian uint32 sizes, then the values (big-endian, row-major).
"""

from __future__ import annotations

import gzip
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stagewise.data.arrays import array_splits
from stagewise.data.files import open_data
from stagewise.data.splits import DataError, DataSplits, check_fractions, default_splits

# type code -> big-endian numpy dtype
IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """The array stored in an IDX file (read-only, big-endian dtype)."""
    try:
        with open_data(path, "IDX file") as f:
            raw = f.read()
    except (EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: broken gzip data ({exc}); the download may be truncated, "
                        f"fetch the file again") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in IDX_TYPES or raw[3] == 0:
        codes = ", ".join(f"{code:02x}" for code in IDX_TYPES)
        raise DataError(f"{path} is not an IDX file: it starts with bytes {raw[:4].hex(' ') or '(none)'}, "
                        f"but an IDX file starts with 00 00, a type code ({codes}) and a "
                        f"number of dimensions >= 1")
    ndim = raw[3]
    offset = 4 + 4 * ndim  # magic, then one uint32 per dimension
    if len(raw) < offset:
        raise DataError(f"{path} is truncated: its header needs {offset} bytes, the file has "
                        f"{len(raw)}; fetch the file again")
    shape = struct.unpack(f">{ndim}I", raw[4:offset])
    dtype = np.dtype(IDX_TYPES[raw[2]])
    count = math.prod(shape)
    expected = offset + count * dtype.itemsize
    if len(raw) != expected:
        problem = "truncated" if len(raw) < expected else "longer than its header says"
        raise DataError(f"{path} is {problem}: an array of shape {shape} and type {dtype.name} "
                        f"needs {expected} bytes, the file has {len(raw)}; fetch the file again")
    return np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(shape)


@dataclass
class IdxOptions:
    """The recipe's ``[data]`` keys for ``stagewise.idx``."""

    images: str  # IDX file of images, e.g. train-images-idx3-ubyte.gz
    labels: str  # IDX file of integer labels, one per image, e.g. train-labels-idx1-ubyte.gz
    scale: float = 1 / 255  # inputs are images * scale; 1/255 maps uint8 pixels to [0, 1]
    splits: dict[str, float] = field(default_factory=default_splits)  # split name -> fraction

    def __post_init__(self) -> None:
        check_fractions(self.splits)


class IdxImages:
    """``stagewise.idx``: items ``{"input": float32 image, e.g. (28, 28), "target": int64 label}``."""

    name = "stagewise.idx"
    Options = IdxOptions

    @classmethod
    def from_recipe(cls, options: IdxOptions, *, seed: int) -> DataSplits:
        images, labels = read_idx(options.images), read_idx(options.labels)
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise DataError(f"{options.labels} holds an array of shape {labels.shape} and type "
                            f"{labels.dtype.name}, but labels must be one integer per image")
        if len(images) != len(labels):
            raise DataError(f"{options.images} has {len(images)} images but {options.labels} has "
                            f"{len(labels)} labels; they must match")
        inputs = images.astype(np.float32) * np.float32(options.scale)  # (N, ...) float32
        return array_splits(inputs, labels, options.splits, seed)
