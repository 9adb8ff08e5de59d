"""What runs on Linux but not on macOS or Windows, checked in the source of every package.

CI runs on Linux only, where Python's default text encoding is UTF-8; on Windows it is the ANSI
code page (cp1252 in the West), so a text file opened without ``encoding=`` reads other
characters there than the UTF-8 every stagewise file is written in.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*ROOT.glob("packages/*/src"), ROOT / "tests_integration" / "stagewise-example-plugin" / "src"])
_TEXT_CALLS = {"open", "read_text", "write_text"}
_MODE = re.compile(r"[rwxabt+]+")


def _name(call: ast.Call) -> str | None:
    """The called function's name: the built-in ``open``, or a method such as ``Path.read_text`` (not
    ``os.open``, which works on bytes, nor a function of stagewise's own, e.g. ``files.read_text``)."""
    func = call.func
    if isinstance(func, ast.Name):
        return func.id if func.id == "open" else None
    if isinstance(func, ast.Attribute) and not (isinstance(func.value, ast.Name) and func.value.id == "os"):
        return func.attr
    return None


def _binary(call: ast.Call) -> bool:
    modes = [a.value for a in [*call.args, *(k.value for k in call.keywords if k.arg == "mode")]
             if isinstance(a, ast.Constant) and isinstance(a.value, str) and _MODE.fullmatch(a.value)]
    return any("b" in mode for mode in modes)


def _unspecified_encodings(file: Path) -> list[str]:
    tree = ast.parse(file.read_text(encoding="utf-8"), str(file))
    return [f"{file.relative_to(ROOT)}:{node.lineno}" for node in ast.walk(tree)
            if isinstance(node, ast.Call) and _name(node) in _TEXT_CALLS and not _binary(node)
            and not any(k.arg == "encoding" for k in node.keywords)]


@pytest.mark.parametrize("src", SOURCES, ids=lambda src: src.parent.name)
def test_every_text_file_is_opened_as_utf8(src):
    found = [where for file in sorted(src.rglob("*.py")) for where in _unspecified_encodings(file)]
    assert found == [], "text opened in the platform's encoding (cp1252 on Windows); pass encoding=\"utf-8\""
