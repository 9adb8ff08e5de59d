"""Reading the IDX format of MNIST (gzip allowed).

An IDX file holds one array: two zero bytes, a type code, the number of dimensions d, then d
big-endian uint32 sizes, then the values (big-endian, row-major).
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np

from stagewise.data.files import gzip_errors, open_data
from stagewise.data.splits import DataError

# type code -> big-endian numpy dtype
IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """The array stored in an IDX file (read-only, big-endian dtype)."""
    with open_data(path, "IDX file") as f, gzip_errors(path):
        raw = f.read()
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
    if count == 0:  # nothing to train on; numpy cannot even shape (0, 2**32 - 1, 2**32 - 1) ("array is too big")
        raise DataError(f"{path} holds no values: its sizes are {shape}, one of them 0; give a file with at least "
                        f"one image or label")
    expected = offset + count * dtype.itemsize
    if len(raw) != expected:
        needs = f"an array of shape {shape} and type {dtype.name} needs {expected} bytes, the file has {len(raw)}"
        little = struct.unpack(f"<{ndim}I", raw[4:offset])
        if len(raw) == offset + math.prod(little) * dtype.itemsize:  # a hand-written file's sizes
            raise DataError(f"{path}: its sizes read big-endian, as IDX stores them, say that {needs}; read "
                            f"little-endian, {little}, they would fit, so write them with struct.pack('>I', size) "
                            f"(numpy: dtype '>u4')")
        problem = "truncated" if len(raw) < expected else "longer than its header says"
        raise DataError(f"{path} is {problem}: {needs}; fetch the file again")
    return np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(shape)

