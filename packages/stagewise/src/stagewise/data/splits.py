"""Named dataset splits, and the one way stagewise divides examples into splits.

Every loader returns a :class:`DataSplits`. Loaders whose source has no predefined splits
divide it by the ``splits`` fractions of their options (e.g. ``{"train": 0.8, "valid": 0.1,
"test": 0.1}``), always into the sizes :func:`split_bounds` gives: as contiguous ranges
(:func:`split_bounds`), after a seeded shuffle (:func:`split_indices`) or dealt in turn
(:func:`deal`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sized
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from stagewise.errors import OptionError, PluginError, StagewiseError
from stagewise.schema import check_options

if TYPE_CHECKING:
    from torch.utils.data import Dataset


class DataError(StagewiseError, ValueError):
    """A data file or data option is invalid; the message names the file (and line) and the fix."""


class DataOptionError(OptionError, DataError):
    """A dataset's options refuse values, naming each key (see :func:`check_data_options`)."""


def check_data_options(**problems: str | None) -> None:
    """Raise DataOptionError naming each key whose problem is not None, e.g.
    ``check_data_options(splits=fractions_problem(self.splits))``."""
    check_options([(False, key, problem) for key, problem in problems.items() if problem is not None],
                  error=DataOptionError)


@dataclass
class DataSplits:
    """Named dataset splits plus facts the model needs (e.g. vocab_size)."""

    splits: Mapping[str, Dataset]  # e.g. {"train": ..., "valid": ..., "test": ...}
    info: dict[str, Any] = field(default_factory=dict)  # e.g. {"vocab_size": 33278}

    def __getitem__(self, name: str) -> Dataset:
        if name not in self.splits:
            raise KeyError(f"no split named {name!r}; the data has splits: {', '.join(self.splits)}")
        return self.splits[name]

    def names(self) -> list[str]:
        return list(self.splits)

    def example(self, name: str) -> dict[str, Any] | None:
        """The split's first example if it is a dict (what pre-run checks read), else None."""
        split = self.splits.get(name)
        if split is None or not hasattr(split, "__len__") or len(split) == 0:
            return None
        first = split[0]
        return first if isinstance(first, dict) else None


def size_of(dataset: Dataset) -> int:
    """``len(dataset)``: the engine batches map-style datasets that know their length (a split, a cache)."""
    if not isinstance(dataset, Sized):
        raise PluginError(f"a dataset of type {type(dataset).__name__} has no len(); the splits a data component "
                          f"returns, and the datasets a stage batches, must define __len__ and __getitem__")
    return len(dataset)


def default_splits() -> dict[str, float]:
    """The ``splits`` option's default: 80% train, 10% valid, 10% test."""
    return {"train": 0.8, "valid": 0.1, "test": 0.1}


def fractions_problem(fractions: dict[str, float]) -> str | None:
    """What is wrong with the ``splits`` key unless ``fractions`` maps split names to positive numbers
    summing to 1."""
    if not isinstance(fractions, dict) or not fractions:
        return (f"must be a table of split name -> fraction, e.g. "
                f'{{train = 0.8, valid = 0.1, test = 0.1}}; got {fractions!r}')
    for name, fraction in fractions.items():
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not fraction > 0:
            return (f"{name} = {fraction!r}: each fraction must be a number > 0 "
                    f"(leave a split out instead of giving it 0)")
    total = sum(fractions.values())
    if not math.isclose(total, 1.0, abs_tol=1e-6):
        listing = ", ".join(f"{name} = {fraction}" for name, fraction in fractions.items())
        return f"fractions sum to {total:g} ({listing}); they must sum to 1"
    return None


def split_bounds(n: int, fractions: dict[str, float], *, source: str | None = None,
                 unit: str = "examples") -> dict[str, tuple[int, int]]:
    """Cut ``range(n)`` into consecutive ``(start, end)`` ranges, one per split, in dict order.

    ``fractions`` must have passed :func:`fractions_problem`. Raises DataError if a split would be
    empty, since an empty split cannot be trained or evaluated on; the message names ``source``
    (the file or corpus) and counts ``unit`` (examples, tokens, documents).
    """
    bounds, start, cumulative = {}, 0, 0.0
    for i, (name, fraction) in enumerate(fractions.items()):
        cumulative += fraction
        end = n if i == len(fractions) - 1 else min(n, round(n * cumulative))
        if end == start:
            where = f"{source}: " if source else ""
            raise DataError(f"{where}split {name!r} would be empty: {fraction:g} of {n} {unit} is less "
                            f"than one; use more data or give {name!r} a larger fraction in data.splits")
        bounds[name] = (start, end)
        start = end
    return bounds


def split_indices(n: int, fractions: dict[str, float], seed: int,
                  *, source: str | None = None) -> dict[str, np.ndarray]:
    """Shuffle ``range(n)`` with ``seed`` and cut it by :func:`split_bounds`; same seed, same split."""
    order = np.random.default_rng(seed).permutation(n)  # (n,) int64
    return {name: order[start:end] for name, (start, end) in split_bounds(n, fractions, source=source).items()}


def deal(n: int, fractions: dict[str, float], *, source: str | None = None,
         unit: str = "examples") -> dict[str, list[int]]:
    """Deal ``0..n-1`` in order to the split furthest behind its share of those dealt so far.

    A split with fraction ``f`` so gets about every ``1/f``-th item, spread over the whole range,
    and gets as many items as :func:`split_bounds` would give it (``source`` and ``unit`` as there).
    """
    sizes = {name: end - start for name, (start, end) in split_bounds(n, fractions, source=source, unit=unit).items()}
    dealt: dict[str, list[int]] = {name: [] for name in fractions}
    for i in range(n):
        open_splits = [name for name in fractions if len(dealt[name]) < sizes[name]]
        # max() keeps the first of equals, so ties go to the split listed first
        name = max(open_splits, key=lambda s: fractions[s] * (i + 1) - len(dealt[s]))
        dealt[name].append(i)
    return dealt
