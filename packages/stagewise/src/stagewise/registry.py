"""Name → component tables filled by the register hooks.

A :class:`Registry` holds one kind (stages, routers, ...). Entries may be lazy
``"module:attribute"`` strings, resolved on first use, so registering costs no imports.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
from dataclasses import dataclass
from typing import Any

from stagewise.errors import PluginError, UnknownNameError
from stagewise.install import install_command

KINDS = ("stages", "routers", "losses", "models", "datasets", "recipes")
CORE_DISTRIBUTION = "stagewise"

# Prefix of a name → the package that provides it, for "pip install ..." hints.
KNOWN_PLUGINS = {
    "lego_ashem": "stagewise-lego-ashem",
    "koopman": "stagewise-koopman",
    "causal_lattice": "stagewise-causal-lattice",
    "tlg8": "stagewise-tlg8-multitask",
    "world_models": "stagewise-world-models",
}


def singular(kind: str) -> str:
    return "loss" if kind == "losses" else kind[:-1]


@dataclass
class Entry:
    """One registered component and the plugin (and distribution) that registered it."""

    name: str
    target: Any  # the object, or a "module:attribute" string until first use when lazy
    plugin: str
    distribution: str
    lazy: bool = False

    def resolve(self) -> Any:
        if self.lazy:
            try:
                obj = _import(self.target)
            except Exception as exc:  # the plugin's import-time code: any failure is the plugin's
                raise PluginError(f"{self.name!r} of plugin {self.plugin!r} ({self.distribution}) cannot be "
                                  f"loaded from {self.target!r}: {type(exc).__name__}: {exc} (reinstall "
                                  f"{self.distribution}, or report this to its authors)") from exc
            self.target, self.lazy = obj, False
        return self.target


class Registry:
    """Components of one kind, by namespaced name."""

    def __init__(self, kind: str):
        self.kind = kind
        self.entries: dict[str, Entry] = {}

    def add(self, obj: Any, name: str | None, plugin: str, distribution: str) -> str:
        """Register ``obj`` as ``name`` (default: ``obj.name``); returns the name it got."""
        name = name if name is not None else getattr(obj, "name", None)
        if not isinstance(name, str) or "." not in name.strip("."):
            # a ValueError, not a PluginError: this plugin alone is broken, and is skipped like one
            raise ValueError(f"a {singular(self.kind)} named {name!r}: names must be namespaced "
                             f"like '{plugin}.thing'")
        if name in self.entries:
            other = self.entries[name]
            raise PluginError(
                f"{singular(self.kind)} {name!r} is registered twice: by plugin {other.plugin!r} "
                f"({other.distribution}) and by plugin {plugin!r} ({distribution}); "
                f"{_collision_hint(other.plugin, other.distribution, plugin, distribution)}"
            )
        lazy = self.kind != "recipes" and isinstance(obj, str)
        if lazy and ":" not in obj:  # would be kept as the component itself, to fail when a recipe uses it
            module, _, attr = obj.rpartition(".")
            example = f"{module}:{attr}" if module else "mypkg.module:Class"
            raise ValueError(f"{singular(self.kind)} {name!r} is registered as the string {obj!r}; give the class, "
                             f"or a lazy 'module:Class' string such as {example!r}")
        self.entries[name] = Entry(name, obj, plugin, distribution, lazy)
        return name

    def remove_plugin(self, plugin: str) -> None:
        for name in [n for n, e in self.entries.items() if e.plugin == plugin]:
            del self.entries[name]

    def names(self) -> list[str]:
        return sorted(self.entries)

    def get(self, name: str, others: dict[str, Registry] | None = None) -> Any:
        entry = self.entries.get(name)
        if entry is None:
            raise UnknownNameError(self._unknown_message(name, others or {}))
        return entry.resolve()

    def _unknown_message(self, name: str, others: dict[str, Registry]) -> str:
        msg = f"unknown {singular(self.kind)} {name!r}"
        elsewhere = [k for k, reg in others.items() if reg is not self and name in reg.entries]
        if elsewhere:
            msg += f" (a {singular(elsewhere[0])} named {name!r} exists)"
        close = difflib.get_close_matches(name, self.names(), n=1)
        if close:
            msg += f"; did you mean {close[0]!r}?"
        prefix = name.split(".", 1)[0]
        installed_prefixes = {n.split(".", 1)[0] for n in self.entries}
        if prefix in KNOWN_PLUGINS and prefix not in installed_prefixes:
            msg += f"; {_missing_plugin_hint(KNOWN_PLUGINS[prefix])}"
        listing = ", ".join(self.names()) or "none"
        end = "" if msg.endswith("?") else "."
        return f"{msg}{end} Installed {self.kind}: {listing}"


def _collision_hint(plugin_a: str, dist_a: str, plugin_b: str, dist_b: str) -> str:
    """What to disable when two plugins register one name: never core, whose names are its own."""
    if CORE_DISTRIBUTION in (dist_a, dist_b):
        plugin, dist = (plugin_b, dist_b) if dist_a == CORE_DISTRIBUTION else (plugin_a, dist_a)
        return (f"the name is core's: disable plugin {plugin!r} with STAGEWISE_DISABLE_PLUGINS={plugin} "
                f"(or uninstall {dist})")
    return f"disable one with STAGEWISE_DISABLE_PLUGINS={plugin_a} or STAGEWISE_DISABLE_PLUGINS={plugin_b}"


def _missing_plugin_hint(distribution: str) -> str:
    """Why a known plugin's names are missing: not installed, or installed but not loaded."""
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return f"it is provided by a plugin that is not installed: {install_command(distribution)}"
    return (f"it is provided by {distribution}, which is installed but was not loaded: left out by "
            f"STAGEWISE_DISABLE_PLUGINS or STAGEWISE_LOAD_PLUGINS, or it failed to load "
            f"(see stagewise plugins)")


def _import(target: str) -> Any:
    """The object a lazy ``"module:attribute.path"`` string names."""
    module, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj
