"""Validate plain TOML data into option dataclasses, collecting every problem.

``coerce(value, type, path, problems)`` checks one value against a type annotation and
returns the converted value; problems are appended as ``"<path>: <what is wrong>"`` so a
recipe with three mistakes reports three. Supported annotations: ``int``, ``float``, ``str``,
``bool``, ``Any``, ``X | None``, ``Literal[...]``, ``list[X]``, ``tuple[X, ...]``,
``dict[str, X]`` and dataclasses (nested tables).

Problems name a list's items as ``--set`` addresses them (:func:`named_paths`): ``path.NAME`` when
the item type names its items through an ``item_name(value)`` classmethod (stages, loss terms),
``path[i]`` otherwise.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable, Container, Iterable, Set
from typing import Any, Literal, Union, get_args, get_origin

from stagewise.errors import OptionError

MISSING = dataclasses.MISSING


@dataclasses.dataclass
class NoOptions:
    """Options of a component that takes none."""


def field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations of a dataclass (works with ``from __future__ import annotations``)."""
    return typing.get_type_hints(cls)


def keys_of(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def unknown_key_message(key: str, path: str, valid: list[str], table: str | None = None) -> str:
    """``key`` is not one of ``valid`` at ``path``; ``table``: the nested table that takes it."""
    where = f"{path}.{key}" if path else key
    if table is not None:  # written beside its table instead of in it, e.g. a router's hard_ratio
        hint = f"; did you mean {path + '.' if path else ''}{table}.{key} (a key of the {table} table)?"
    else:
        close = difflib.get_close_matches(key, valid, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{where}: unknown key{hint or '.'} Valid keys: {', '.join(sorted(valid)) or 'none'}"


def _table_taking(key: str, types_: dict[str, Any], fields: list[str], raw: dict) -> str | None:
    """The field among ``fields`` that is a nested table (a dataclass) taking ``key``, if any. A
    dataclass whose keys depend on the table (a spec's, on the component its ``use`` names) tells
    them through a ``keys_for(table)`` classmethod."""
    for name in fields:
        cls = types_[name]
        if isinstance(cls, type) and dataclasses.is_dataclass(cls):
            keys = cls.keys_for(raw.get(name)) if hasattr(cls, "keys_for") else keys_of(cls)
            if key in keys:
                return name
    return None


def build_dataclass(cls: type, raw: Any, path: str, problems: list[str],
                    extra_ok: frozenset[str] = frozenset(), written: Container[str] = ()) -> Any:
    """Instantiate dataclass ``cls`` from the table ``raw``; returns None if it had problems. Its value
    checks run even when other keys have type problems (see :func:`construct`). ``written``: the keys
    of ``raw`` the recipe's table at ``path`` sets (a ``grow`` merged into the model's options)."""
    if not isinstance(raw, dict):
        problems.append(f"{path}: expected a table, got {_describe(raw)}")
        return None
    types_ = field_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    before = len(problems)
    values, bad = coerce_keys(
        {k: v for k, v in raw.items() if k not in extra_ok}, {name: types_[name] for name in fields}, path, problems,
        unknown=lambda key: unknown_key_message(key, path, [*fields, *extra_ok],
                                                _table_taking(key, types_, list(fields), raw)))
    missing = [name for name, f in fields.items() if name not in raw and _required(f)]
    problems.extend(f"{_join(path, name)}: required key is missing ({_type_name(types_[name])})" for name in missing)
    return construct(cls, values, path, problems, bad, failed=len(problems) > before, written=written)


def coerce_keys(table: dict[str, Any], types_: dict[str, Any], path: str, problems: list[str],
                unknown: Callable[[str], str] | None = None) -> tuple[dict[str, Any], set[str]]:
    """Each value of ``table`` coerced to its key's type in ``types_``, and the keys whose value had a
    problem; a key ``types_`` lacks is skipped, its problem ``unknown(key)`` (default: the valid keys)."""
    values, bad = {}, set()
    for key, value in table.items():
        if key not in types_:
            problems.append(unknown(key) if unknown else unknown_key_message(key, path, list(types_)))
            continue
        before = len(problems)
        values[key] = coerce(value, types_[key], _join(path, key), problems)
        if len(problems) > before:
            bad.add(key)
    return values, bad


def construct(cls: type, values: dict[str, Any], path: str, problems: list[str],
              bad: Set[str] = frozenset(), failed: bool = False, written: Container[str] = ()) -> Any:
    """``cls(**values)``, whose ``__post_init__`` checks the values; None when it refuses them or when
    ``failed`` (the table had other problems), so that one round reports every problem.

    ``bad``: keys whose value had a problem; they are left at their defaults so the other keys are still
    checked. An :class:`~stagewise.errors.OptionError`'s problems are reported as ``path.KEY: message``,
    except those whose check read a bad key; KEY is the first of the check's keys in ``written`` (the keys
    the table at ``path`` sets, when ``values`` holds more), so the problem names a key that table has.
    A plain ValueError names no key: it is reported against the table, and only when nothing else was
    wrong (it may be about a key left at its default)."""
    fields = [f for f in dataclasses.fields(cls) if f.init]
    kept = {k: v for k, v in values.items() if k not in bad}
    if any(f.name not in kept and _required(f) for f in fields):  # nothing can stand in for it
        return None
    try:
        built = cls(**kept)
    except OptionError as exc:
        problems.extend(f"{_join(path, _named(keys, written))}: {message}" for keys, message in exc.problems.items()
                        if not bad & {key.partition(".")[0] for key in keys})  # fit.dmd_every reads fit
        return None
    except (ValueError, TypeError) as exc:  # __post_init__ checks that name no key
        if not failed:
            problems.append(f"{path or cls.__name__}: {exc}")
        return None
    return None if failed else built


def check_options(checks: Iterable[tuple[bool, str | tuple[str, ...], str]],
                  error: type[OptionError] = OptionError) -> None:
    """Raise :class:`~stagewise.errors.OptionError` for every failed ``(ok, key, message)`` check, so
    that an Options dataclass's ``__post_init__`` reports all its problems at once, each named by its
    key: ``stages.train.lr: must be > 0, got -1.0``. ``key``: the key the problem names, or a tuple of
    it and the other keys the check reads (``("min_lr", "lr")``); a key's messages are joined by "; ".
    ``error``: the OptionError subclass to raise."""
    problems: dict[str | tuple[str, ...], str] = {}
    for ok, key, message in checks:
        if not ok:
            problems[key] = f"{problems[key]}; {message}" if key in problems else message
    if problems:
        raise error(problems)


def _named(keys: tuple[str, ...], written: Container[str]) -> str:
    return next((key for key in keys if key in written), keys[0])


def _required(f: dataclasses.Field) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def coerce(value: Any, annotation: Any, path: str, problems: list[str]) -> Any:
    """``value`` checked against ``annotation`` and converted (see the module docs)."""
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation is Any:
        return value
    if origin in (Union, types.UnionType):
        return _coerce_union(value, args, path, problems)
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            problems.append(f"{path}: {value!r} is not one of the valid choices: {choices}{_close_choice(value, args)}")
        return value
    if origin in (list, tuple):
        return _coerce_list(value, origin, args[0] if args else Any, path, problems)
    if origin is dict:
        return _coerce_dict(value, args[1] if len(args) == 2 else Any, path, problems)
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        coerce_hook = getattr(annotation, "from_table", None)
        if coerce_hook is not None:
            return coerce_hook(value, path, problems)
        return build_dataclass(annotation, value, path, problems)
    return _coerce_scalar(value, annotation, path, problems)


def named_paths(path: str, names: list[Any]) -> list[str]:
    """How problems name the items of the list at ``path``, given each item's name (None: it has none):
    ``path.NAME`` as ``--set`` addresses it (``stages.NAME``, ``stages.NAME.losses.TERM``), or
    ``path[i]``, by position, when its name is missing, shared with another item, or one ``--set``
    cannot address."""
    return [f"{path}.{name}" if _addressable(name) and names.count(name) == 1 else f"{path}[{i}]"
            for i, name in enumerate(names)]


def _addressable(name: Any) -> bool:
    """Whether ``--set PATH.NAME.key=...`` reaches an item of this name (see ``recipe.apply_override``)."""
    return isinstance(name, str) and bool(name) and name == name.strip() and not set(name) & set(".=")


def _coerce_union(value: Any, args: tuple, path: str, problems: list[str]) -> Any:
    if value is None and type(None) in args:
        return None
    candidates = [a for a in args if a is not type(None)]
    for candidate in candidates:
        trial: list[str] = []
        result = coerce(value, candidate, path, trial)
        if not trial:
            return result
    if len(candidates) == 1:
        return coerce(value, candidates[0], path, problems)
    expected = " or ".join(_type_name(a) for a in candidates)
    problems.append(f"{path}: expected {expected}, got {_describe(value)}")
    return value


def _close_choice(value: Any, choices: tuple[Any, ...]) -> str:
    """A hint for a string a case or a typo away from a choice ('BF16', 'adam'): "; did you mean 'bf16'?"."""
    by_lower = {c.lower(): c for c in choices if isinstance(c, str)}
    close = difflib.get_close_matches(value.lower(), list(by_lower), n=1) if isinstance(value, str) else []
    return f"; did you mean {by_lower[close[0]]!r}?" if close else ""


def _coerce_list(value: Any, origin: type, item_type: Any, path: str, problems: list[str]) -> Any:
    """A ``list[X]`` or ``tuple[X, ...]`` (``origin``): each item coerced to ``item_type``."""
    if not isinstance(value, list | tuple):
        problems.append(f"{path}: expected a list, got {_describe(value)}")
        return value
    name_of = getattr(item_type, "item_name", None)  # items --set addresses by name, e.g. loss terms
    paths = named_paths(path, [name_of(v) if name_of else None for v in value])
    items = [coerce(v, item_type, item_path, problems) for v, item_path in zip(value, paths, strict=True)]
    return tuple(items) if origin is tuple else items


def _coerce_dict(value: Any, item_type: Any, path: str, problems: list[str]) -> Any:
    """A ``dict[str, X]``: each value coerced to ``item_type``."""
    if not isinstance(value, dict):
        problems.append(f"{path}: expected a table, got {_describe(value)}")
        return value
    return {k: coerce(v, item_type, f"{path}.{k}", problems) for k, v in value.items()}


def _coerce_scalar(value: Any, annotation: Any, path: str, problems: list[str]) -> Any:
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float) and isinstance(value, bool):
        problems.append(f"{path}: expected {annotation.__name__}, got {_describe(value)}")
        return value
    if annotation is str and isinstance(value, int | float) and not isinstance(value, bool):
        # --set run.name=2024 reads a TOML number: the string must be quoted, past the shell too
        key = path if "[" not in path else "KEY"  # stages[0].x, losses[1].x: a position --set cannot address
        problems.append(f"{path}: expected str, got {_describe(value)}; quote it: \"{value}\" "
                        f"(with --set: --set '{key}=\"{value}\"')")
    elif isinstance(annotation, type) and not isinstance(value, annotation):
        problems.append(f"{path}: expected {_type_name(annotation)}, got {_describe(value)}")
    return value


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return "a table"
    return f"{type(value).__name__} {value!r}"


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def as_table(options: Any) -> Any:
    """A dataclass instance (or a list or dict of them) back to plain TOML-ready data (None values dropped)."""
    if dataclasses.is_dataclass(options) and not isinstance(options, type):
        to_table = getattr(options, "to_table", None)
        if to_table is not None:
            return to_table()
        return {f.name: as_table(getattr(options, f.name)) for f in dataclasses.fields(options)
                if getattr(options, f.name) is not None}
    if isinstance(options, list | tuple):
        return [as_table(v) for v in options]
    if isinstance(options, dict):
        return {k: as_table(v) for k, v in options.items() if v is not None}
    return options
