"""The docs cover the code: every hook spec, recipe key (core's, and the keys this repository's
plugins add, on their pages) and core command is documented, the generated CLI page is fresh,
quoted code equals its file, and every shipped recipe validates.

Each check is parametrized, so one run lists every gap.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any

import generate_cli
import includes
import pytest

import stagewise
from stagewise import plugins, registry
from stagewise.cli.main import build_parser
from stagewise.recipe import RunOptions, load_recipe
from stagewise.schema import as_table, build_dataclass
from stagewise.specs import DataSpec, LossSpec, ModelSpec, StageSpec

DOCS = Path(__file__).parent
PAGES = sorted(DOCS.rglob("*.md"))
CORE_RECIPES = Path(stagewise.__file__).parent / "recipes"


def read(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


def headings(text: str) -> list[tuple[int, str, int]]:
    """(level, title, line number) of each Markdown heading outside fenced code."""
    found, fenced = [], False
    for i, line in enumerate(text.splitlines()):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"(#+) (.*)", line)):
            found.append((len(m[1]), m[2], i))
    return found


def section(text: str, marker: str) -> str:
    """The section whose heading contains ``marker``, down to the next heading of its level."""
    lines, heads = text.splitlines(), headings(text)
    for k, (level, title, start) in enumerate(heads):
        if marker in title:
            end = next((i for lvl, _, i in heads[k + 1:] if lvl <= level), len(lines))
            return "\n".join(lines[start:end])
    raise AssertionError(f"no heading contains {marker!r}")


# --- hooks ----------------------------------------------------------------------------------

HOOKS = sorted(name for name, caller in vars(plugins.plugin_manager().hook).items()
               if name.startswith("stagewise_") and caller.spec is not None)


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented(hook):
    spec = getattr(plugins.plugin_manager().hook, hook).spec
    signature = f"{hook}({', '.join(spec.argnames)})"
    text = read("hooks.md")
    assert any(signature in title for _, title, _ in headings(text)), f"hooks.md: no heading {signature}"
    body = section(text, signature)
    assert [a for a in spec.argnames if f"`{a}`" not in body] == [], f"hooks.md: {signature} misses arguments"


# --- recipe keys ----------------------------------------------------------------------------

ENGINE_TABLES = {"`[run]`": RunOptions, "`[data]`": DataSpec, "`[model]`": ModelSpec,
                 "`[[stages]]`": StageSpec, "Loss terms": LossSpec}
CORE_KINDS = ("stages", "losses", "models", "datasets", "routers")


def _options_tables() -> dict[str, type]:
    """Section marker -> the dataclass whose fields that section must document."""
    tables = dict(ENGINE_TABLES)
    for kind in CORE_KINDS:
        for name, entry in plugins.registries()[kind].entries.items():
            if entry.distribution == plugins.CORE_DISTRIBUTION:
                tables[f"`{name}`"] = getattr(plugins.get(kind, name), "Options", None)
    return tables


RECIPE_KEYS = [(marker, f.name) for marker, cls in _options_tables().items() if cls is not None
               for f in dataclasses.fields(cls) if f.init and f.name != "options"]


@pytest.mark.parametrize(("table", "key"), RECIPE_KEYS, ids=[f"{t.strip('`')}.{k}" for t, k in RECIPE_KEYS])
def test_recipe_key_is_documented(table, key):
    assert f"`{key}`" in section(read("recipes.md"), table), f"recipes.md: section {table} misses `{key}`"


def _own_fields(cls: type) -> list[str]:
    """The recipe keys a class adds to the dataclasses it extends (e.g. stagewise.train's, which
    recipes.md documents once)."""
    inherited = {f.name for base in cls.__mro__[1:] if dataclasses.is_dataclass(base)
                 for f in dataclasses.fields(base)}
    return [f.name for f in dataclasses.fields(cls) if f.init and f.name not in inherited | {"options"}]


def _plugin_keys() -> list[tuple[str, str, str]]:
    """(page, component, key) for each component of this repository's plugins with a page."""
    keys = []
    for registry_ in plugins.registries().values():
        for name, entry in registry_.entries.items():
            page = Path("plugins") / f"{entry.distribution.removeprefix('stagewise-')}.md"
            options = getattr(entry.resolve(), "Options", None) if (DOCS / page).is_file() else None
            if entry.distribution != plugins.CORE_DISTRIBUTION and dataclasses.is_dataclass(options):
                keys += [(str(page), name, key) for key in _own_fields(options)]
    return keys


PLUGIN_KEYS = _plugin_keys()


@pytest.mark.parametrize(("page", "component", "key"), PLUGIN_KEYS, ids=[f"{c}.{k}" for _, c, k in PLUGIN_KEYS])
def test_plugin_recipe_key_is_documented(page, component, key):
    assert f"`{key}`" in section(read(page), f"`{component}`"), f"{page}: section `{component}` misses `{key}`"


# --- what the option tables say: defaults and ranges ----------------------------------------


def _option_rows(text: str) -> dict[str, dict[str, str]]:
    """Key -> {column title: cell} of each row of the Markdown tables in ``text`` whose first cell names keys."""
    rows, header = {}, None
    for line in text.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
        elif not set(cells[0]) <= set("- "):
            rows.update((key, dict(zip(header, cells, strict=False))) for key in re.findall(r"`(\w+)`", cells[0]))
    return rows


def _documented_tables() -> list[tuple[str, str, type]]:
    """(page, section marker, Options dataclass) of core's tables in recipes.md and the plugins' on their pages."""
    tables = [("recipes.md", marker, cls) for marker, cls in _options_tables().items() if cls is not None]
    documented = {(page, component) for page, component, _ in PLUGIN_KEYS}
    for kind, registry_ in plugins.registries().items():
        tables += [(page, f"`{name}`", plugins.get(kind, name).Options) for page, name in sorted(documented)
                   if name in registry_.entries]
    return tables


def _option_cells() -> list[tuple[str, str, type, str, dict[str, str]]]:
    cells = []
    for page, marker, cls in _documented_tables():
        rows = _option_rows(section(read(page), marker))
        cells += [(page, marker, cls, f.name, rows[f.name]) for f in dataclasses.fields(cls) if f.name in rows]
    return cells


OPTION_CELLS = _option_cells()
CELL_IDS = [f"{marker.strip('`')}.{key}" for _, marker, _, key, _ in OPTION_CELLS]


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


@pytest.mark.parametrize(("page", "table", "cls", "key", "cells"), OPTION_CELLS, ids=CELL_IDS)
def test_documented_default_is_the_default(page, table, cls, key, cells):
    """*required*, unset (None) or one TOML literal; a default the code derives (``1/255``, "the stage's name")
    is not compared."""
    written, default = cells["default"], _default(next(f for f in dataclasses.fields(cls) if f.name == key))
    if written == "*required*" or default is dataclasses.MISSING:
        assert written == "*required*" and default is dataclasses.MISSING, f"{page} {table}: {key} is {written}"
    elif written.startswith("unset"):
        assert default is None, f"{page} {table}: {key} is unset, the code's default is {default!r}"
    elif literal := re.fullmatch(r"`([^`]+)`(?::.*)?", written):
        try:
            value = tomllib.loads(f"v = {literal[1]}")["v"]
        except tomllib.TOMLDecodeError:
            return
        code = as_table(default)
        code = [as_table(v) for v in code] if isinstance(code, tuple) else code
        # a table default lists the keys it gives (a loss term's `use`), not every key its default fills in
        assert value == code or _within(value, code), f"{page} {table}: {key} defaults to {written}, code {code!r}"


def _within(written: Any, code: Any) -> bool:
    if isinstance(written, list) and isinstance(code, list):
        return len(written) == len(code) and all(map(_within, written, code))
    if isinstance(written, dict) and isinstance(code, dict):
        return all(k in code and _within(v, code[k]) for k, v in written.items())
    return written == code


def _number(text: str) -> float:
    """A number as docs write it: ``1e30``, ``-2\\*\\*40`` (Markdown for -(2 ** 40))."""
    sign, digits = (-1, text[1:]) if text.startswith("-") else (1, text)
    base, _, power = digits.replace("\\", "").partition("**")
    return sign * (float(base) ** float(power) if power else float(base))


def _bounds(written_type: str) -> list[tuple[float, bool, bool]]:
    """The numeric bounds a type cell states, as (bound, is_lower, inclusive): "integer ≥ 1", "float > 0, ≤ 1e30",
    "float in (0, 1]", "integer, 0 to 1024", "integer, -2**40 < seed < 2**40"."""
    num = r"(-?[\d.e\\*]+)"
    if m := re.search(rf"in ([\[(]){num}, {num}([\])])", written_type):
        return [(_number(m[2]), True, m[1] == "["), (_number(m[3]), False, m[4] == "]")]
    if m := re.search(rf", {num} to {num}$", written_type):
        return [(_number(m[1]), True, True), (_number(m[2]), False, True)]
    if m := re.search(rf", {num} < \w+ < {num}$", written_type):
        return [(_number(m[1]), True, False), (_number(m[2]), False, False)]
    return [(_number(bound), op in "≥>", op in "≥≤") for op, bound in re.findall(rf"([≥>≤<]) {num}", written_type)
            if re.fullmatch(num, bound)][:2]


RANGES = [(page, table, cls, key, bound) for page, table, cls, key, cells in OPTION_CELLS
          if (kind := re.match(r"(?:finite )?(integer|float)\b", cells.get("type", "")))
          for bound in _bounds(cells["type"])]


NEEDS = {"ema_momentum_end": {"ema_momentum": 0.5}}  # the keys a documented "needs X" asks for


def _refuses(cls: type, table: str, key: str, value: Any) -> bool:
    """Whether the table ``table`` (with ``key = value``) has a problem at ``key``."""
    base = {"Loss terms": {"use": "stagewise.cross_entropy"}, "`[[stages]]`": {"name": "s"},
            "`[model]`": {"use": "stagewise.transformer"}}.get(table, {})
    problems: list[str] = []
    build_dataclass(cls, {**base, **NEEDS.get(key, {}), key: value}, "t", problems)
    return any(p.startswith(f"t.{key}:") for p in problems)


@pytest.mark.parametrize(("page", "table", "cls", "key", "bound"), RANGES,
                         ids=[f"{t.strip('`')}.{k}{'>' if b[1] else '<'}{b[0]:g}" for _, t, _, k, b in RANGES])
def test_documented_range_is_checked(page, table, cls, key, bound):
    """The edge of a documented range is accepted when the range includes it and refused when it does not; a value
    past it (by 1 for an integer, by 1% for a float, as docs round 3.4028e38 to 3.4e38) is refused."""
    edge, lower, inclusive = bound
    is_int = "int" in str(next(f.type for f in dataclasses.fields(cls) if f.name == key))
    step = 1 if is_int else max(abs(edge), 1) * 0.01
    past = edge - step if lower else edge + step
    inside = edge if inclusive else (edge + step if lower else edge - step)
    if is_int:
        past, inside = int(past), int(inside)
    assert _refuses(cls, table, key, past), f"{page} {table}: {key} = {past!r} is outside the documented range"
    assert not _refuses(cls, table, key, inside), f"{page} {table}: {key} = {inside!r} is in the documented range"


# --- CLI ------------------------------------------------------------------------------------


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _plugin_commands() -> set[str]:
    """Subcommands that plugins add through stagewise_register_commands (documented on their pages)."""
    names: set[str] = set()
    for impl in plugins.plugin_manager().hook.stagewise_register_commands.get_hookimpls():
        sub = argparse.ArgumentParser().add_subparsers()
        impl.function(**({"cli": sub} if "cli" in impl.argnames else {}))
        names |= set(sub.choices)
    return names


@pytest.mark.parametrize("command", sorted(set(_subcommands(build_parser())) - _plugin_commands()))
def test_cli_command_is_documented(command):
    assert command in generate_cli.core_commands(), f"{command!r} is neither a core nor a plugin command"
    assert f"## stagewise {command}\n" in read("cli.md"), f"cli.md misses {command!r}: run python docs/generate_cli.py"


def test_cli_reference_is_fresh():
    assert read("cli.md") == generate_cli.render(), "docs/cli.md is stale: run python docs/generate_cli.py"


# --- quoted code, links, plugins, recipes ---------------------------------------------------

QUOTES = [(page, path) for page in PAGES for path, _ in includes.includes(page.read_text(encoding="utf-8"))]


@pytest.mark.parametrize(("page", "path"), QUOTES, ids=[f"{p.name}:{q}" for p, q in QUOTES])
def test_quoted_code_equals_its_file(page, path):
    quoted = dict(includes.includes(page.read_text(encoding="utf-8")))[path]
    assert quoted == (includes.ROOT / path).read_text(encoding="utf-8"), \
        f"{page.name} quotes an old {path}: run python docs/includes.py"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(DOCS)) for p in PAGES])
def test_relative_links_resolve(page):
    targets = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8"))
    assert [t for t in targets if not (page.parent / t).exists()] == []


@pytest.mark.parametrize("prefix", sorted(registry.KNOWN_PLUGINS))
def test_known_plugin_is_listed(prefix):
    listing = read("plugins/README.md")
    assert f"`{prefix}.*`" in listing and f"pip install {registry.KNOWN_PLUGINS[prefix]}" in listing


@pytest.mark.parametrize("recipe", sorted(CORE_RECIPES.glob("*.toml")), ids=lambda p: p.name)
def test_core_recipe_validates(recipe):
    assert load_recipe(recipe).stages


def _core_building_blocks() -> list[tuple[str, str]]:
    """(module, name) for each name the "What to import from core" table of plugin-authoring.md lists."""
    text = (DOCS / "plugin-authoring.md").read_text(encoding="utf-8")
    section = text.split("## 11. What to import from core", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(stagewise[\w.]*)` \| ([^|]*) \|", section, flags=re.M)
    return [(module, name) for module, names in rows for name in re.findall(r"`(\w+)`", names)]


@pytest.mark.parametrize("module, name", _core_building_blocks())
def test_a_core_building_block_for_plugins_exists(module, name):
    import importlib

    assert hasattr(importlib.import_module(module), name), f"plugin-authoring.md lists {module}.{name}"


def _core_imports_of_plugins() -> list[tuple[str, str, str]]:
    """(file, module, name) for each name a shipped or example plugin imports from a core submodule."""
    import ast

    root = DOCS.parent
    sources = list(root.glob("packages/stagewise-*/src/**/*.py"))
    sources += list(root.glob("tests_integration/stagewise-example-plugin/src/**/*.py"))
    found = []
    for path in sorted(sources):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("stagewise."):
                found += [(path.relative_to(root).as_posix(), node.module, alias.name) for alias in node.names]
    return found


@pytest.mark.parametrize("path, module, name", _core_imports_of_plugins())
def test_what_plugins_import_from_core_is_a_documented_building_block(path, module, name):
    # the top-level namespace is public; anything else a plugin leans on must be in the table, or it may change
    assert name in stagewise.__all__ or (module, name) in _core_building_blocks(), (
        f"{path} imports {module}.{name}: list it under 'What to import from core' in plugin-authoring.md")
