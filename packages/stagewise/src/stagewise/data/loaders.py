"""Datasets for the files users bring: ``stagewise.csv``, ``.jsonl``, ``.idx`` and ``.npz``.

Each reads its whole source, shuffles the examples with the run's seed and cuts them into
splits by the ``splits`` fractions (same seed, same split). Items are
``{"input": ..., "target": ...}`` tensors; see :func:`stagewise.data.arrays.array_splits` for
the ``info`` they provide (``n_features``, ``n_outputs``, ...). Files may be gzip-compressed
(except ``.npz``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from stagewise.data.arrays import array_splits, read_npz
from stagewise.data.files import encoding_problem
from stagewise.data.idx import read_idx
from stagewise.data.labels import ClassLabels
from stagewise.data.splits import DataError, DataSplits, check_data_options, default_splits, fractions_problem
from stagewise.data.tabular import column_indices, read_csv, read_jsonl, reading, shape_targets

TARGET_DTYPES = ("float", "long")


def keys_problem(option: str, keys: Any, required: bool = True) -> str | None:
    """Column or key lists must be non-empty lists (or unset, where that is allowed)."""
    if (keys is None and not required) or (isinstance(keys, list) and keys):
        return None
    return f'must be a non-empty list, e.g. {option} = ["y"]; got {keys!r}'


def target_dtype_problem(target_dtype: str) -> str | None:
    if target_dtype in TARGET_DTYPES:
        return None
    return f'must be "float" (regression) or "long" (class labels), got {target_dtype!r}'


# --- CSV ------------------------------------------------------------------------------------


@dataclass
class CSVOptions:
    """The recipe's ``[data]`` keys for ``stagewise.csv``."""

    path: str  # CSV file of numbers, one example per row
    target: list[str | int]  # target columns, by header name or 0-based index
    features: list[str | int] | None = None  # input columns; unset: every non-target column
    header: bool = True  # the first row names the columns
    target_dtype: Literal["float", "long"] = "float"  # "long": class labels (int64)
    splits: dict[str, float] = field(default_factory=default_splits)  # split name -> fraction
    encoding: str = "utf-8"  # of the file, e.g. "latin-1" or "cp1252"; a UTF-8 BOM is dropped

    def __post_init__(self) -> None:
        check_data_options(target=keys_problem("target", self.target),
                           features=keys_problem("features", self.features, required=False),
                           target_dtype=target_dtype_problem(self.target_dtype),
                           splits=fractions_problem(self.splits), encoding=encoding_problem(self.encoding))


class CSVDataset:
    """A numeric CSV file: items ``{"input": float32 (F,), "target": scalar or (K,)}``.

    One target column gives a scalar target per example, several give a vector.
    """

    name = "stagewise.csv"
    Options = CSVOptions

    @classmethod
    def from_recipe(cls, options: CSVOptions, *, seed: int) -> DataSplits:
        labels = ClassLabels(options.target) if options.target_dtype == "long" else None
        with reading(options.path, "CSV file") as read:
            names, values, lines = read_csv(options.path, options.header, options.encoding, labels, read)
        width = values.shape[1]
        target = column_indices("target", options.target, names, width, options.path)
        if options.features is None:
            features = [j for j in range(width) if j not in target]
        else:
            features = column_indices("features", options.features, names, width, options.path)
        both = [names[j] if names else j for j in target if j in features]
        if both:  # the model would be handed its answer
            listed = ", ".join(map(repr, both))
            what = f"columns {listed} are" if len(both) > 1 else f"column {listed} is"
            raise DataError(f"{options.path}: {what} in both data.features and data.target; "
                            f"data.features must not name a target column")
        if not features:
            raise DataError(f"{options.path}: no feature columns are left besides the target; "
                            f"the file needs at least one input column")
        targets = shape_targets(values[:, target], options.target_dtype, lines, options.path)
        return with_classes(array_splits(_columns(values, features), targets, options.splits, seed,
                                         source=options.path), labels)


def _columns(values: np.ndarray, indices: list[int]) -> np.ndarray:
    """``values[:, indices]``; a view, not a copy of the table, when the columns are consecutive (as the
    features mostly are: every column but a first or last target)."""
    start = indices[0]
    if indices == list(range(start, start + len(indices))):
        return values[:, start:start + len(indices)]
    return values[:, indices]


# --- JSON Lines -----------------------------------------------------------------------------


@dataclass
class JSONLOptions:
    """The recipe's ``[data]`` keys for ``stagewise.jsonl``."""

    path: str  # JSON Lines file: one JSON object (one example) per line
    input_keys: list[str]  # keys whose values (numbers or lists of numbers), concatenated, are the input
    target_keys: list[str]  # keys whose values, concatenated, are the target
    target_dtype: Literal["float", "long"] = "float"  # "long": class labels (int64)
    splits: dict[str, float] = field(default_factory=default_splits)  # split name -> fraction
    encoding: str = "utf-8"  # of the file, e.g. "latin-1" or "cp1252"; a UTF-8 BOM is dropped

    def __post_init__(self) -> None:
        check_data_options(input_keys=keys_problem("input_keys", self.input_keys),
                           target_keys=keys_problem("target_keys", self.target_keys) or _shared_keys_problem(
                               self.input_keys, self.target_keys),
                           target_dtype=target_dtype_problem(self.target_dtype),
                           splits=fractions_problem(self.splits), encoding=encoding_problem(self.encoding))


def _shared_keys_problem(input_keys: list[str], target_keys: list[str]) -> str | None:
    """A key both input and target would hand the model its answer (as a CSV column in both does)."""
    both = [key for key in dict.fromkeys(target_keys) if key in input_keys] if isinstance(input_keys, list) else []
    if not both:
        return None
    what = f"keys {', '.join(map(repr, both))} are" if len(both) > 1 else f"key {both[0]!r} is"
    return f"{what} in input_keys too, which would hand the model its answer; a target key must not be an input"


class JSONLDataset:
    """A JSON Lines file: items ``{"input": float32 (F,), "target": scalar or (K,)}``.

    Values may be numbers or (nested) lists of numbers; they are flattened and concatenated.
    A target of one number per example is a scalar, of several a vector.
    """

    name = "stagewise.jsonl"
    Options = JSONLOptions

    @classmethod
    def from_recipe(cls, options: JSONLOptions, *, seed: int) -> DataSplits:
        labels = ClassLabels() if options.target_dtype == "long" else None
        with reading(options.path, "JSONL file") as read:
            inputs, targets, lines = read_jsonl(options.path, options.input_keys, options.target_keys,
                                                options.encoding, labels, read)
        targets = shape_targets(targets, options.target_dtype, lines, options.path)
        return with_classes(array_splits(inputs, targets, options.splits, seed, source=options.path), labels)


def with_classes(data: DataSplits, labels: ClassLabels | None) -> DataSplits:
    """``data`` with ``info["classes"]``, each target of class names -> its names in label order, if any."""
    if labels is not None and labels.names:
        data.info["classes"] = labels.names
    return data


# --- IDX (MNIST) ----------------------------------------------------------------------------


@dataclass
class IDXOptions:
    """The recipe's ``[data]`` keys for ``stagewise.idx``."""

    # file paths, relative to the recipe's folder (the metadata tells the recipe loader)
    images: str = field(metadata={"path": True})  # IDX file of images, e.g. train-images-idx3-ubyte.gz
    labels: str = field(metadata={"path": True})  # IDX file of integer labels, one per image
    scale: float = 1 / 255  # inputs are images * scale; 1/255 maps uint8 pixels to [0, 1]
    splits: dict[str, float] = field(default_factory=default_splits)  # split name -> fraction

    def __post_init__(self) -> None:
        check_data_options(splits=fractions_problem(self.splits))


class IDXDataset:
    """MNIST-style IDX files: items ``{"input": float32 image, e.g. (28, 28), "target": int64}``; images are held
    as the file stores them (a byte a pixel) and scaled as batches are drawn."""

    name = "stagewise.idx"
    Options = IDXOptions

    @classmethod
    def from_recipe(cls, options: IDXOptions, *, seed: int) -> DataSplits:
        images, labels = read_idx(options.images), read_idx(options.labels)
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise DataError(f"{options.labels} holds an array of shape {labels.shape} and type "
                            f"{labels.dtype.name}, but labels must be one integer per image")
        if len(images) != len(labels):
            raise DataError(f"{options.images} has {len(images)} images but {options.labels} has "
                            f"{len(labels)} labels; they must match")
        check_scale(images, options.scale, options.images, "images")
        return array_splits(images, labels, options.splits, seed, source=options.images, scale=options.scale)


def check_scale(inputs: np.ndarray, scale: float, source: str, name: str) -> None:
    """DataError unless ``inputs * scale`` is finite in float32. Converting and scaling keep the order of the
    values (or reverse it), so the smallest and largest values are the ones to try."""
    if not inputs.size:  # no examples, or no values per example: array_splits says which
        return
    ends = inputs.min(), inputs.max()
    if not np.isfinite(ends).all():  # NaN or infinity in the file: array_splits names the example
        return
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused below, naming the fix
        scaled = np.array(ends).astype(np.float32) * np.float32(scale)
    if not np.isfinite(scaled).all():
        raise DataError(f"{source}: {name} * scale ({scale}) is not finite; use a scale such as 1/255")


# --- NPZ ------------------------------------------------------------------------------------


@dataclass
class NPZOptions:
    """The recipe's ``[data]`` keys for ``stagewise.npz``."""

    path: str  # .npz file (numpy.savez); axis 0 of each array indexes the examples
    input_key: str = "input"  # name of the array of inputs in the file
    target_key: str = "target"  # name of the array of targets in the file
    # inputs are input * scale in float32, e.g. 1/255 for uint8 pixels; unset: as stored (float32 or int64)
    scale: float | None = None
    splits: dict[str, float] = field(default_factory=default_splits)  # split name -> fraction

    def __post_init__(self) -> None:
        check_data_options(splits=fractions_problem(self.splits))


class NPZDataset:
    """Two arrays of a ``.npz`` file, e.g. trajectories and their targets.

    Float arrays become float32 tensors, integer and bool arrays int64 (token ids, labels); shapes are kept.
    With ``scale`` the inputs are ``input * scale`` in float32, integer inputs held as stored (a byte a uint8
    pixel) and scaled as batches are drawn.
    """

    name = "stagewise.npz"
    Options = NPZOptions

    @classmethod
    def from_recipe(cls, options: NPZOptions, *, seed: int) -> DataSplits:
        inputs, targets = read_npz(options.path, options.input_key, options.target_key)
        if options.scale is not None:
            check_scale(inputs, options.scale, options.path, repr(options.input_key))
        return array_splits(inputs, targets, options.splits, seed, source=options.path, scale=options.scale)
