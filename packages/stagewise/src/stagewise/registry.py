"""Name → component tables filled by the register hooks.

A :class:`Registry` holds one kind (stages, routers, ...). Entries may be lazy
``"module:attribute"`` strings, resolved on first use, so registering costs no imports.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import sys
from dataclasses import dataclass
from typing import Any

from stagewise.errors import PluginError, UnknownNameError
from stagewise.install import install_command

KINDS = ("stages", "routers", "losses", "models", "datasets", "recipes")
# what a plugin's code may raise as it loads or registers: a failure of that plugin alone. SystemExit too
# (``sys.exit("needs CUDA")`` at import), which would end every command; Ctrl-C still stops the process
PLUGIN_FAILURES = (Exception, SystemExit)
CORE_DISTRIBUTION = "stagewise"

# Prefix of a name → the package that provides it, for "pip install ..." hints.
KNOWN_PLUGINS = {
    "lego_ashem": "stagewise-lego-ashem",
    "koopman": "stagewise-koopman",
    "causal_lattice": "stagewise-causal-lattice",
    "tlg8": "stagewise-tlg8-multitask",
    "world_models": "stagewise-world-models",
}

# The base class a component of these kinds must subclass, checked when a lazy string is resolved
# (imported only then: the loss module imports torch). Models and datasets have no base class.
BASE_CLASSES = {"stages": "stagewise.stage:Stage", "losses": "stagewise.loss:Loss",
                "routers": "stagewise.router:Router"}


def singular(kind: str) -> str:
    return "loss" if kind == "losses" else kind[:-1]


@dataclass
class Entry:
    """One registered component and the plugin (and distribution) that registered it."""

    kind: str  # stages, routers, ...
    name: str
    target: Any  # the object, or a "module:attribute" string until first use when lazy
    plugin: str
    distribution: str
    lazy: bool = False

    def resolve(self) -> Any:
        """The component; a lazy string is imported (and checked against its kind's base class) once."""
        if self.lazy:
            try:
                obj = _import(self.target)
            except PLUGIN_FAILURES as exc:  # the plugin's import-time code: any failure is the plugin's
                raise PluginError(f"{self.name!r} of plugin {self.plugin!r} ({self.distribution}) cannot be "
                                  f"loaded from {self.target!r}: {type(exc).__name__}: {exc} (reinstall "
                                  f"{self.distribution}, or report this to its authors)") from exc
            self._check_kind(obj)
            self.target, self.lazy = obj, False
        return self.target

    def _check_kind(self, obj: Any) -> None:
        """A PluginError unless ``obj`` subclasses its kind's base class (a function registered as a
        loss would fail only when used, with an AttributeError far from the registration)."""
        if self.kind not in BASE_CLASSES:
            return
        base = _import(BASE_CLASSES[self.kind])
        mismatch = _kind_mismatch(obj, base, f"stagewise.{base.__name__}")
        if mismatch is not None:
            raise PluginError(f"{singular(self.kind)} {self.name!r} of plugin {self.plugin!r} ({self.distribution}) is "
                              f"registered as {self.target!r}, {mismatch}; the plugin must register a class that "
                              f"subclasses stagewise.{base.__name__} (report this to its authors)")


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
        if not lazy and self.kind in BASE_CLASSES:  # an object: checked now, so that its plugin is skipped
            module, _, attr = BASE_CLASSES[self.kind].partition(":")
            base = getattr(sys.modules.get(module), attr, None)  # not imported yet: nothing subclasses it
            mismatch = _kind_mismatch(obj, base, f"stagewise.{attr}")
            if mismatch is not None:
                raise ValueError(f"{singular(self.kind)} {name!r} is registered as {obj!r}, {mismatch}; register a "
                                 f"class that subclasses stagewise.{attr}")
        self.entries[name] = Entry(self.kind, name, obj, plugin, distribution, lazy)
        return name

    def remove_plugin(self, plugin: str) -> None:
        for name in [n for n, e in self.entries.items() if e.plugin == plugin]:
            del self.entries[name]

    def names(self) -> list[str]:
        return sorted(self.entries)

    def get(self, name: str, others: dict[str, Registry] | None = None, skipped: dict[str, str] | None = None) -> Any:
        """The component registered as ``name``. An unknown name is an UnknownNameError listing what
        exists; ``skipped`` maps the plugins that were not loaded to why (see :func:`_plugin_hint`)."""
        entry = self.entries.get(name)
        if entry is None:
            raise UnknownNameError(self._unknown_message(name, others or {}, skipped or {}))
        return entry.resolve()

    def _unknown_message(self, name: str, others: dict[str, Registry], skipped: dict[str, str]) -> str:
        msg = f"unknown {singular(self.kind)} {name!r}"
        elsewhere = [k for k, reg in others.items() if reg is not self and name in reg.entries]
        if elsewhere:
            msg += f" (a {singular(elsewhere[0])} named {name!r} exists)"
        close = _close_names(name, self.names())
        if close:
            msg += f"; did you mean {' or '.join(map(repr, close))}?"
        prefix = name.split(".", 1)[0]
        hint = _plugin_hint(prefix, skipped)
        if hint and prefix not in {n.split(".", 1)[0] for n in self.entries}:
            msg += f"; {hint}"
        listing = ", ".join(self.names()) or "none"
        end = "" if msg.endswith(("?", ".")) else "."
        return f"{msg}{end} Installed {self.kind}: {listing}"


def _kind_mismatch(obj: Any, base: type | None, public: str) -> str | None:
    """``which is a function, not a subclass of stagewise.Loss`` (``public``: the base class's name),
    unless ``obj`` subclasses ``base`` (None: it is not imported yet, so nothing subclasses it)."""
    if base is not None and isinstance(obj, type) and issubclass(obj, base):
        return None
    what = f"the class {obj.__name__}" if isinstance(obj, type) else f"a {type(obj).__name__}"
    return f"which is {what}, not a subclass of {public}"


def _plugin_hint(prefix: str, skipped: dict[str, str]) -> str | None:
    """Why the names of namespace ``prefix`` are missing, when a plugin of that name was skipped
    (``skipped``: plugin name -> why, e.g. "the plugin 'x' (stagewise-x 0.1) failed to load: ...")
    or is a known plugin (:data:`KNOWN_PLUGINS`); None when nothing is known of it."""
    if prefix in skipped:
        return skipped[prefix]
    return _missing_plugin_hint(KNOWN_PLUGINS[prefix]) if prefix in KNOWN_PLUGINS else None


def _close_names(name: str, names: list[str]) -> list[str]:
    """The registered names ``name`` may have meant: a near miss of a whole name; for a name without a
    namespace, the names whose part after the dot is ``name`` (a plugin recipe called by its short name,
    ``l2`` for ``actstats.l2``) or a near miss of it."""
    close = difflib.get_close_matches(name, names, n=1)
    if close or "." in name:
        return close
    by_short: dict[str, list[str]] = {}
    for full in names:
        by_short.setdefault(full.split(".", 1)[1], []).append(full)
    short = difflib.get_close_matches(name, list(by_short), n=1)
    return by_short[short[0]] if short else []


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
