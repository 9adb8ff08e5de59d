"""Reading tables of numbers, one example per row, from CSV and JSON Lines files.

Either file may be gzip-compressed. Every error names the file and the line.
"""

from __future__ import annotations

import csv
import json
import math
from array import array
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import filterfalse
from pathlib import Path
from typing import Any

import numpy as np

from stagewise.data.files import existing_file, text_lines
from stagewise.data.labels import ClassLabels, TargetLabels, is_name
from stagewise.data.splits import DataError
from stagewise.engine.progress import loading_bar

MAX_LABEL = 2.0 ** 53  # the whole numbers a float64 holds exactly


def shape_targets(targets: np.ndarray, target_dtype: str, lines: list[int], path: str) -> np.ndarray:
    """Targets (N, K) as class labels (int64) for ``"long"``, and as scalars (N,) when K = 1."""
    if target_dtype == "long":
        whole = np.isfinite(targets) & (targets == np.round(targets))  # (N, K)
        not_whole = np.flatnonzero(~whole.all(axis=1))
        if len(not_whole):
            row = not_whole[0]
            raise DataError(f"{path}, line {lines[row]}: target {targets[row].tolist()} is not a whole "
                            f"number, but target_dtype = \"long\" wants class labels; use "
                            f"target_dtype = \"float\" for regression")
        too_large = np.flatnonzero((np.abs(targets) > MAX_LABEL).any(axis=1))
        if len(too_large):  # as int64 it would wrap round (1e20 -> -2**63)
            row = too_large[0]
            raise DataError(f"{path}, line {lines[row]}: target {targets[row].tolist()} is too large for a class "
                            f"label (at most 2**53); use target_dtype = \"float\" for regression")
        targets = targets.astype(np.int64)
    return targets[:, 0] if targets.shape[1] == 1 else targets  # one value per example: a scalar


@contextmanager
def reading(path: str, what: str) -> Iterator[Callable[[int], object]]:
    """``read`` for :func:`read_csv` and :func:`read_jsonl`: a loading bar of the bytes of ``path`` read,
    named by the file (a file of a few hundred MB takes a quarter of a minute to read)."""
    file = existing_file(path, what)
    with loading_bar(f"reading {file.name}", total=file.stat().st_size) as bar:
        yield bar.update


def read_csv(path: str, header: bool, encoding: str, labels: ClassLabels | None = None,
             read: Callable[[int], object] | None = None) -> tuple[list[str] | None, np.ndarray, list[int]]:
    """Column names (None without header), the values (N, columns) and each row's line. ``labels``: the target
    columns of class labels, which may hold class names (:mod:`stagewise.data.labels`); the values of a column
    of names are their labels, and ``labels.names`` holds the names. ``read``: told the bytes read
    (:func:`reading`)."""
    reader = csv.reader(text_lines(path, "CSV file", encoding, read=read))
    numbers = array("d")  # values row after row: 8 bytes a number, not a float object
    lines: list[int] = []
    rows = filterfalse(_blank, reader)
    targets: dict[int, TargetLabels] = {}  # the columns of labels, set by the first data row
    named: dict[int, TargetLabels] = {}  # those of class names
    try:
        names = next(rows, []) if header else None
        width = len(names) if names is not None else None
        for row in rows:
            width = len(row) if width is None else width
            if len(row) != width:
                hint = _separator_hint(names or [], "header") or _separator_hint(row)
                raise DataError(f"{path}, line {reader.line_num}: {len(row)} cells, but the "
                                f"{'header' if header else 'first row'} has {width}; give every row one "
                                f"number per column{hint}")
            if labels is not None and not lines:
                targets = _csv_targets(row, labels, names, width, path, reader.line_num)
                named = {j: target for j, target in targets.items() if target.codes is not None}
            for j, target in named.items():
                row[j] = str(target.code(row[j].strip(), reader.line_num))
            try:
                numbers.extend(map(float, row))  # the hot loop of a big file (a bad row's numbers are never used)
            except ValueError:
                j = _first_bad_cell(row)
                if j in targets and is_name(row[j]):  # a class name among labels that are numbers
                    raise targets[j].mixed(row[j], reader.line_num) from None
                names_row = "; if this row names the columns, set data.header = true" if not (header or lines) else ""
                raise _bad_cell(row, path, reader.line_num, names, "is not a number; every cell must be numeric "
                                f"(fill in missing values, encode categories as numbers){names_row}") from None
            lines.append(reader.line_num)
    except csv.Error as exc:  # e.g. a cell longer than the csv module's limit (131072 characters)
        raise DataError(f"{path}, line {reader.line_num}: cannot be read as CSV ({exc}); every cell must "
                        f"be a number: check that this is a CSV file of numbers") from None
    if not lines:
        raise DataError(f"{path} has no data rows")
    values = np.frombuffer(numbers, dtype=np.float64).reshape(len(lines), -1)  # (N, columns), no copy
    finite = np.isfinite(values)  # float() also reads "nan" and "inf": training on them fails
    if not finite.all():
        i = int(np.flatnonzero(~finite.all(axis=1))[0])
        raise _bad_cell(_row_at(path, lines[i], encoding), path, lines[i], names, "is not a finite number; fill "
                        "in missing values (NaN and infinity cannot be trained on)",
                        column=int(np.flatnonzero(~finite[i])[0]))  # not a class name the row holds before it
    if labels is not None:
        labels.names.update((target.target, target.recode(values[:, j])) for j, target in named.items())
    return names, values, lines


def _csv_targets(row: list[str], labels: ClassLabels, names: list[str] | None, width: int, path: str,
                 line: int) -> dict[int, TargetLabels]:
    """The target columns of class labels, each of names or of numbers as its cell in ``row`` (the first) is."""
    targets = {}
    for j in column_indices("target", labels.targets, names, width, path):
        first = row[j].strip()
        hint = "; if that line names the columns, set data.header = true" if names is None and is_name(first) else ""
        targets[j] = TargetLabels(names[j] if names else str(j), _column(j, names), first, line, path=path, hint=hint)
    return targets


def _blank(row: list[str]) -> bool:
    """A blank line, or one of spaces only (as editors leave), which holds no example."""
    return not row or (len(row) == 1 and not row[0].strip())


def _bad_cell(row: list[str], path: str, line: int, names: list[str] | None, problem: str,
              column: int | None = None) -> DataError:
    """The error for ``column`` of ``row``, by default its first cell that is not a finite number."""
    j = _first_bad_cell(row) if column is None else column
    hint = _separator_hint(row) or _decimal_comma_hint(row[j])
    return DataError(f"{path}, line {line}, {_column(j, names)}: {row[j]!r} {problem}{hint}")


def _first_bad_cell(row: list[str]) -> int:
    """The index of the first cell of ``row`` that is not a finite number (there is one)."""
    return next(j for j, cell in enumerate(row) if not _finite_number(cell))


def _column(j: int, names: list[str] | None) -> str:
    """How messages name column ``j``: "column 4 ('species')"."""
    return f"column {j}" + (f" ({names[j]!r})" if names else "")


def _row_at(path: str, line: int, encoding: str) -> list[str]:
    """The CSV row that ends on ``line``, read again: only an error needs the cells' text."""
    reader = csv.reader(text_lines(path, "CSV file", encoding))
    return next(row for row in reader if reader.line_num == line)


def _finite_number(cell: str) -> bool:
    try:
        return math.isfinite(float(cell))
    except ValueError:
        return False


def _separator_hint(cells: list[str], what: str = "row") -> str:
    """A row read as one cell that holds another separator: the file is not comma-separated."""
    separator = next((sep for sep in (";", "\t", "|") if len(cells) == 1 and sep in cells[0]), None)
    if separator is None:
        return ""
    return (f"; the {what} is one cell holding {separator!r}: stagewise reads comma-separated files with '.' "
            f"decimals, so replace {separator!r} by ',' (and a decimal comma such as 1,5 by 1.5), or save the "
            f"file as CSV with commas")


def _decimal_comma_hint(cell: str) -> str:
    """A quoted number with a decimal comma ("1,5"), as a spreadsheet in a comma-decimal locale writes it."""
    if "," not in cell or not _finite_number(cell.replace(",", ".", 1)):
        return ""
    return f"; write the decimal comma of {cell!r} as a point, {cell.replace(',', '.', 1)}"


def _header_hint(column: str, names: list[str]) -> str:
    """Why a header a person typed lacks ``column``: spaces after the commas."""
    padded = [name for name in names if name != name.strip() and name.strip() == column]
    if not padded:
        return ""
    return f"; the header writes it {padded[0]!r}: remove the spaces around the names after the commas"


def column_indices(option: str, columns: list[str | int], names: list[str] | None, width: int,
                   path: str) -> list[int]:
    """0-based indices of ``columns`` (header names or indices) in a table ``width`` wide."""
    indices = []
    for column in columns:
        if isinstance(column, str):
            if names is None:
                raise DataError(f"{path}: data.{option} names column {column!r}, but data.header = false "
                                f"so columns have no names; give 0-based column indices")
            if column not in names:
                raise DataError(f"{path} has no column {column!r} ({option}); its columns are: "
                                f"{', '.join(names)}{_header_hint(column, names)}")
            same = [j for j, name in enumerate(names) if name == column]
            if len(same) > 1:  # which one is meant? and a copy of the target left as a feature gives the answer away
                raise DataError(f"{path}: the header names {len(same)} columns {column!r} (0-based columns "
                                f"{', '.join(map(str, same))}), which data.{option} cannot tell apart; give "
                                f"every column its own name")
            indices.append(same[0])
        elif isinstance(column, int) and not isinstance(column, bool) and 0 <= column < width:
            indices.append(column)
        else:
            valid = f"its columns are {', '.join(names)}, or " if names else ""
            raise DataError(f"{path}: data.{option} names column {column!r}, which is neither a column name "
                            f"nor a column index; {valid}0-based indices 0..{width - 1}")
    return indices


def flatten(value: Any) -> list[float]:
    """A number or (nested) list of numbers as one flat list; TypeError for anything else."""
    if isinstance(value, list):
        if all(type(item) is float for item in value):  # the common case: no call per number (a big file's hot loop)
            return value
        return [number for item in value for number in flatten(item)]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return [float(value)]
        except OverflowError:  # an integer beyond float's range: as infinite, which callers refuse
            return [math.inf if value > 0 else -math.inf]
    raise TypeError(f"not a number: {value!r}")


def record_numbers(record: dict[str, Any], keys: list[str], path: str, line: int,
                   targets: bool = False) -> list[float]:
    """The values of ``keys`` (``targets``: the target keys) in ``record``, flattened and concatenated."""
    numbers = []
    for key in keys:
        if key not in record:
            raise DataError(f"{path}, line {line}: key {key!r} is missing; the line has keys "
                            f"{', '.join(record) or 'none'}")
        try:
            values = flatten(record[key])
        except TypeError:
            hint = _string_hint(record[key], key, targets)
            raise DataError(f"{path}, line {line}: {key!r} is {json.dumps(record[key])[:60]}, but "
                            f"it must be a number or a list of numbers{hint}") from None
        if not all(map(math.isfinite, values)):  # json reads NaN and Infinity
            raise DataError(f"{path}, line {line}: {key!r} is {json.dumps(record[key])[:60]}, but its "
                            f"numbers must be finite (fill in missing values)")
        numbers.extend(values)
    return numbers


def _string_hint(value: Any, key: str, targets: bool) -> str:
    """What a string where numbers belong may be: a class name (a target), or language-modelling text
    (stagewise.text reads .jsonl too)."""
    if not isinstance(value, str):
        return ""
    if targets:
        return '; class names are read as labels with target_dtype = "long"'
    return f'; for text, use = "stagewise.text" with text_field = "{key}"'


def read_jsonl(path: str, input_keys: list[str], target_keys: list[str], encoding: str,
               labels: ClassLabels | None = None,
               read: Callable[[int], object] | None = None) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Inputs (N, F), targets (N, K) and each example's line. ``labels``: the target keys of class labels, which
    may hold class names (:mod:`stagewise.data.labels`); a key of names gives their labels, and
    ``labels.names`` holds the names. ``read``: told the bytes read (:func:`reading`)."""
    inputs, targets, lines = array("d"), array("d"), []  # row after row: 8 bytes a number
    widths = None  # (input, target) numbers of the first line, which every line must have
    keys = _KeyLabels(labels, target_keys, path) if labels is not None else None
    for line, text in enumerate(text_lines(path, "JSONL file", encoding, read=read), start=1):
        if not text.strip():
            continue
        x, y = _line_numbers(text, input_keys, target_keys, path, line, keys)
        if widths is None:
            widths = (len(x), len(y), line)
        if (len(x), len(y)) != widths[:2]:
            raise DataError(f"{path}, line {line}: {len(x)} input and {len(y)} target numbers, "
                            f"but line {widths[2]} has {widths[0]} and {widths[1]}; "
                            f"every line must have the same number of values")
        inputs.extend(x)
        targets.extend(y)
        lines.append(line)
    if widths is None:  # no line with numbers
        raise DataError(f"{path} has no data lines")
    target_values = np.frombuffer(targets, dtype=np.float64).reshape(len(lines), widths[1])
    if keys is not None:
        keys.recode(target_values)
    return np.frombuffer(inputs, dtype=np.float64).reshape(len(lines), widths[0]), target_values, lines


class _KeyLabels:
    """The target keys of class labels in a JSONL file, each of names or of numbers as its first value is."""

    def __init__(self, labels: ClassLabels, keys: list[str], path: str):
        self.labels, self.keys, self.path = labels, keys, path
        self.targets: dict[str, TargetLabels] = {}  # set by the first record
        self.columns: list[tuple[str, int]] = []  # each key of names and its column of the targets

    def code(self, record: dict[str, Any], line: int) -> None:
        """Put the labels of ``record``'s class names in their place (before its numbers are read)."""
        if not self.targets:
            self._first(record, line)
        for key, target in self.targets.items():
            if key not in record:  # record_numbers names it
                continue
            if target.codes is not None:
                record[key] = target.code(record[key], line)
            elif is_name(record[key]):
                raise target.mixed(record[key], line)

    def _first(self, record: dict[str, Any], line: int) -> None:
        self.targets = {key: TargetLabels(key, repr(key), record.get(key), line, path=self.path) for key in self.keys}
        column = 0
        for key in self.keys:
            if self.targets[key].codes is not None:
                self.columns.append((key, column))
            column += 1 if is_name(record.get(key)) else _width(record.get(key))

    def recode(self, targets: np.ndarray) -> None:
        """Relabel the targets (N, K) by each key's sorted names, which ``labels.names`` takes."""
        for key, column in self.columns:
            self.labels.names[key] = self.targets[key].recode(targets[:, column])


def _width(value: Any) -> int:
    """How many numbers a target's value gives (1 for one record_numbers will refuse)."""
    try:
        return len(flatten(value))
    except TypeError:
        return 1


def _line_numbers(text: str, input_keys: list[str], target_keys: list[str], path: str,
                  line: int, labels: _KeyLabels | None) -> tuple[list[float], list[float]]:
    """The input and target numbers of one JSONL line."""
    try:
        record = json_object(text, path, line)
        if labels is not None:
            labels.code(record, line)
        return (record_numbers(record, input_keys, path, line),
                record_numbers(record, target_keys, path, line, targets=True))
    except RecursionError:
        raise DataError(f"{path}, line {line}: lists nested too deeply to read; values must be "
                        f"numbers or (nested) lists of numbers of a few levels") from None
    except DataError:
        raise
    except ValueError as exc:  # an integer of more digits than Python converts
        raise DataError(f"{path}, line {line}: a number is too long to read ({str(exc).split(';')[0]}); "
                        f"values must be numbers of float range") from None


def json_object(text: str, path: str | Path, line: int) -> dict[str, Any]:
    """The JSON object on one line of a JSON Lines file; a DataError naming the file and line when
    the line holds no valid JSON, or JSON that is not an object."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}, line {line}: not valid JSON ({exc.msg} {_json_error_place(text, exc.pos)}); "
                        f"each line must be one JSON object") from None
    if not isinstance(record, dict):
        raise DataError(f"{path}, line {line}: expected a JSON object {{...}}, got {json.dumps(record)[:60]}")
    return record


def _json_error_place(text: str, pos: int) -> str:
    """Where on its line json stopped (its own colno counts from the line end it reads as a new line)."""
    if pos < len(text.rstrip()):
        return f"at column {pos + 1}"
    return "at the end of the line: an object must not go on to the next line, as in a pretty-printed .json file"
