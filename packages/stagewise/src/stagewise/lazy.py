"""Module attributes imported on first use (PEP 562), so that importing a package stays cheap.

    __getattr__ = lazy_attributes(__name__, {"Engine": "mypkg.engine"})  # mypkg.Engine imports mypkg.engine
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_attributes(module: str, table: dict[str, str]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` for ``module`` that imports ``table[name]`` and returns its ``name``."""

    def __getattr__(name: str) -> Any:
        if name in table:
            return getattr(importlib.import_module(table[name]), name)
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
