"""Class labels given by name ("setosa", "cat") in a CSV column or a JSONL key, read as integers.

A target's labels are all numbers, read as they are, or all class names: each name is then read as its
index among the target's names sorted, so the same names give the same labels whatever order the rows
come in. The names are kept (:attr:`ClassLabels.names`) so that predictions can be read back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TypeGuard

import numpy as np

from stagewise.data.splits import DataError


@dataclass
class ClassLabels:
    """The targets of ``target_dtype = "long"``, whose labels may be class names (CSV columns, by name or index;
    a JSONL file's target keys all are); after reading, ``names`` holds each target of names' names in label
    order (target -> names)."""

    targets: list[str | int] = field(default_factory=list)
    names: dict[str, list[str]] = field(default_factory=dict)


class TargetLabels:
    """One target's labels as read: numbers (``codes`` None), or names coded in order of first appearance."""

    def __init__(self, target: str, where: str, first: object, line: int, *, path: str, hint: str = ""):
        self.target = target  # its key in ClassLabels.names
        self.where = where  # how messages name it: "column 4 ('species')", "'species'"
        self.first, self.line = first, line  # the first label and its line, which set names or numbers
        self.path, self.hint = path, hint
        self.codes: dict[str, int] | None = {} if is_name(first) else None

    def code(self, label: object, line: int) -> int:
        """The label of the class ``label`` names, in order of first appearance (:meth:`recode` sorts them)."""
        codes = self.codes
        assert codes is not None  # called for a target of names only
        code = codes.get(label) if isinstance(label, str) else None
        if code is None:
            if not is_name(label):
                raise self.mixed(label, line)
            code = codes[label] = len(codes)
        return code

    def mixed(self, label: object, line: int) -> DataError:
        """The error for a label unlike the first: a name among numbers, a number among names, or neither."""
        first = "a class name" if self.codes is not None else "a number"
        return DataError(f"{self.path}, line {line}, {self.where}: the label {label!r} is {_kind(label)}, but line "
                         f"{self.line} gives {self.first!r}, {first}; a target's labels must all be numbers or all "
                         f"be class names (fill in missing labels){self.hint}")

    def recode(self, labels: np.ndarray) -> list[str]:
        """Relabel ``labels`` (this target's codes, as read) in place by the names' sorted order; the names."""
        assert self.codes is not None
        names = sorted(self.codes)
        rank = np.empty(len(names), dtype=labels.dtype)
        rank[[self.codes[name] for name in names]] = np.arange(len(names))
        labels[...] = rank[labels.astype(np.intp)]
        return names


def is_name(label: object) -> TypeGuard[str]:
    """A class name: a string, not blank, that does not read as a number (a CSV's "3" is the label 3; "nan"
    is a missing number, not a class)."""
    return isinstance(label, str) and bool(label.strip()) and _number(label) is None


def _number(label: object) -> float | None:
    """``label`` as a number (a string as ``float`` reads it); None if it is none."""
    if isinstance(label, bool) or not isinstance(label, str | int | float):
        return None
    try:
        return float(label)
    except (ValueError, OverflowError):
        return None


def _kind(label: object) -> str:
    if isinstance(label, str) and not label.strip():
        return "empty"
    if is_name(label):
        return "a class name"
    number = _number(label)
    if number is None:
        return "neither a number nor a class name"
    return "a number" if math.isfinite(number) else "not a finite number"
