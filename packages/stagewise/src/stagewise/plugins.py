"""Plugin discovery and the registries the register hooks fill.

Plugins are modules named by entry points in the group ``stagewise``. Each is loaded on its
own: a broken one prints one warning line and is skipped, unless ``STAGEWISE_STRICT_PLUGINS=1``
makes it an error. ``STAGEWISE_DISABLE_PLUGINS=a,b`` skips plugins by entry-point name,
``STAGEWISE_LOAD_PLUGINS=a,b`` loads only those, and ``STAGEWISE_TRACE_PLUGINS=1`` prints every
hook call. Core's built-ins are registered the same way, after the entry points.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pluggy

from stagewise import hookspecs
from stagewise.errors import PluginError
from stagewise.registry import CORE_DISTRIBUTION, KINDS, PLUGIN_FAILURES, Registry

if TYPE_CHECKING:
    import argparse

ENTRY_POINT_GROUP = "stagewise"
# core's built-in plugins, by plugin name, registered after the entry points
DEFAULT_PLUGINS = {"stagewise": "stagewise.builtins.plugin", "stagewise.curves": "stagewise.builtins.curves",
                   "stagewise.tensorboard": "stagewise.builtins.tensorboard"}


@dataclass
class PluginInfo:
    """What ``stagewise plugins`` shows for one plugin."""

    name: str
    distribution: str
    version: str
    registered: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in KINDS})
    hooks: list[str] = field(default_factory=list)  # event and command hooks it implements
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "distribution": self.distribution, "version": self.version,
                **self.registered, "hooks": self.hooks, "error": self.error}


class _Host:
    """The plugin manager, the registries and what was loaded. One per process."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("stagewise")
        self.pm.add_hookspecs(hookspecs)
        self.registries = {kind: Registry(kind) for kind in KINDS}
        self.infos: dict[str, PluginInfo] = {}
        self.skipped: dict[str, str] = {}  # plugin name -> why it was not loaded, for unknown-name errors
        self.loaded = False
        self.tracing = False


_host = _Host()


def _env_list(name: str) -> set[str]:
    return {p.strip() for p in os.environ.get(name, "").split(",") if p.strip()}


def strict() -> bool:
    return os.environ.get("STAGEWISE_STRICT_PLUGINS", "") not in ("", "0")


def load_plugins() -> None:
    """Load every plugin once; later calls do nothing."""
    if _host.loaded:
        return
    _host.loaded = True
    if os.environ.get("STAGEWISE_TRACE_PLUGINS", "") not in ("", "0"):
        _host.tracing = True
        _host.pm.add_hookcall_monitoring(lambda name, impls, kwargs: trace(name, impls), lambda *a: None)
    disabled, only = _env_list("STAGEWISE_DISABLE_PLUGINS"), _env_list("STAGEWISE_LOAD_PLUGINS")
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        dist = ep.dist.name if ep.dist else "?"
        version = ep.dist.version if ep.dist else "?"
        info = PluginInfo(ep.name, dist, version)
        if ep.name in disabled or (only and ep.name not in only):
            how, variable = (("disabled by", "STAGEWISE_DISABLE_PLUGINS") if ep.name in disabled
                             else ("left out by", "STAGEWISE_LOAD_PLUGINS"))
            _skip(info, f"is {how} {variable}={os.environ[variable]}")
            continue
        _host.infos[ep.name] = info
        try:
            module = ep.load()
        except PLUGIN_FAILURES as exc:  # any failure in third-party code must not stop the others
            _fail(info, exc, "import")
            continue
        register_plugin(module, ep.name, dist, version)
    version = sys.modules["stagewise"].__version__
    for name, module_name in DEFAULT_PLUGINS.items():
        register_plugin(importlib.import_module(module_name), name, CORE_DISTRIBUTION, version)


def register_plugin(module: ModuleType | object, name: str, distribution: str | None = None,
                    version: str = "0") -> PluginInfo:
    """Register one plugin object and run its register hooks; used by loading and by tests."""
    info = _host.infos.get(name) or PluginInfo(name, distribution or name, version)
    _host.infos[name] = info
    try:
        _host.pm.register(module, name=name)
        _host.pm.check_pending()
        _run_register_hooks(module, info)
        info.hooks = sorted(h.name for h in _host.pm.get_hookcallers(module) or []
                            if not h.name.startswith("stagewise_register_") or h.name.endswith("_commands"))
    except PluginError:  # a name registered twice: two plugins are involved, so skip neither
        unregister_plugin(name, keep_info=True)
        raise
    except PLUGIN_FAILURES as exc:  # a partly registered plugin is taken out again
        unregister_plugin(name, keep_info=True)
        _fail(info, exc, "registration")
    return info


def register_commands(cli: argparse._SubParsersAction) -> None:
    """Call each plugin's ``stagewise_register_commands`` on its own, in pluggy's order: one that
    raises is taken out, with the subcommands it added, like a plugin that fails to load."""
    from stagewise.engine.failures import noted  # not above: it imports this module

    hook = plugin_manager().hook.stagewise_register_commands
    for impl in reversed(hook.get_hookimpls()):  # pluggy calls the last registered first
        trace(hook.name, [impl])
        before = dict(cli.choices), list(cli._choices_actions)  # to take out what a failure added
        try:
            with noted("adding commands", f"{hook.name} hook of plugin {impl.plugin_name!r}"):  # strict mode shows it
                impl.function(**({"cli": cli} if "cli" in impl.argnames else {}))
        except PLUGIN_FAILURES as exc:  # third-party code: it must not take the other commands down
            cli.choices.clear()
            cli.choices.update(before[0])
            cli._choices_actions[:] = before[1]
            info = _host.infos.get(impl.plugin_name) or PluginInfo(impl.plugin_name, impl.plugin_name, "?")
            unregister_plugin(impl.plugin_name, keep_info=True)
            _fail(info, exc, hook.name)


def unregister_plugin(name: str, keep_info: bool = False) -> None:
    """Remove a plugin and everything it registered."""
    if _host.pm.get_plugin(name) is not None:
        _host.pm.unregister(name=name)
    for registry in _host.registries.values():
        registry.remove_plugin(name)
    if not keep_info:
        _host.infos.pop(name, None)


def _run_register_hooks(module: object, info: PluginInfo) -> None:
    for kind in KINDS:
        hook = getattr(_host.pm.hook, f"stagewise_register_{kind}")
        for impl in hook.get_hookimpls():
            if impl.plugin is not module:
                continue
            trace(hook.name, [impl])

            def register(obj: Any, name: str | None = None, _kind: str = kind) -> None:
                info.registered[_kind].append(_host.registries[_kind].add(obj, name, info.name, info.distribution))

            impl.function(**({"register": register} if "register" in impl.argnames else {}))


def _fail(info: PluginInfo, exc: BaseException, during: str) -> None:
    info.error = f"{type(exc).__name__}: {exc}"
    info.registered = {k: [] for k in KINDS}
    _skip(info, f"failed to load: {info.error}")
    message = f"plugin {info.name!r} ({info.distribution} {info.version}) failed during {during}: {info.error}"
    if strict():
        raise PluginError(message + " (STAGEWISE_STRICT_PLUGINS is set)") from exc
    print(f"stagewise: warning: skipped {message}", file=sys.stderr)


def _skip(info: PluginInfo, why: str) -> None:
    """Remember why a plugin is not loaded: an unknown name in its namespace says so."""
    _host.skipped[info.name] = f"the plugin {info.name!r} ({info.distribution} {info.version}) {why}"


def trace(hook_name: str, impls: Sequence[Any]) -> None:
    """With STAGEWISE_TRACE_PLUGINS=1, print each hook call and the plugins it reaches."""
    if _host.tracing:
        print(f"stagewise: trace: {hook_name} -> {[i.plugin_name for i in impls]}", file=sys.stderr)


def plugin_manager() -> pluggy.PluginManager:
    load_plugins()
    return _host.pm


def plugin_infos() -> list[PluginInfo]:
    load_plugins()
    return sorted(_host.infos.values(), key=lambda i: (i.name != "stagewise", i.name))


def versions() -> dict[str, str]:
    """The version of each distribution a plugin loaded without error comes from, core's included, and
    torch's (``{"stagewise": "0.1.0", "torch": "2.13.0+cpu", ...}``): the code a checkpoint was written with
    (another torch may round differently, so a run continued by it ends with numbers of neither)."""
    import torch  # loaded already by what writes or resumes a checkpoint. str: a TorchVersion is no weights_only type

    return {**{i.distribution: i.version for i in plugin_infos() if i.error is None}, "torch": str(torch.__version__)}


def registries() -> dict[str, Registry]:
    load_plugins()
    return _host.registries


def third_party_plugin_of(module_name: str) -> PluginInfo | None:
    """The loaded third-party plugin whose package (the top-level one of its plugin module) holds
    module ``module_name``; None for core's modules and any other."""
    package = module_name.partition(".")[0]
    for name, plugin in _host.pm.list_name_plugin():
        info = _host.infos.get(name)
        own = plugin.__name__ if isinstance(plugin, ModuleType) else type(plugin).__module__
        if info is not None and info.distribution != CORE_DISTRIBUTION and own.partition(".")[0] == package:
            return info
    return None


def get(kind: str, name: str) -> Any:
    """The component of ``kind`` registered as ``name``; an unknown name lists what exists."""
    regs = registries()
    return regs[kind].get(name, others=regs, skipped=_host.skipped)
