"""A plugin that raises on import: a warning by default, an error in strict mode, silent when disabled."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

BROKEN_ERROR = "RuntimeError: this plugin is broken on purpose"


@pytest.fixture
def broken_env(tmp_path: Path, env_without_strict: dict[str, str]) -> dict[str, str]:
    """An installed distribution ``stagewise-broken 0.0.1`` (a dist-info folder on PYTHONPATH)
    whose entry point ``broken`` names a module that raises on import."""
    site = tmp_path / "site"
    info = site / "stagewise_broken-0.0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: stagewise-broken\nVersion: 0.0.1\n")
    (info / "entry_points.txt").write_text("[stagewise]\nbroken = stagewise_broken\n")
    (site / "stagewise_broken.py").write_text('raise RuntimeError("this plugin is broken on purpose")\n')
    path = os.pathsep.join(p for p in (str(site), env_without_strict.get("PYTHONPATH")) if p)
    return {**env_without_strict, "PYTHONPATH": path}


def test_broken_plugin_is_one_warning_line(cli, broken_env):
    result = cli("plugins", env=broken_env)
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1, result.stderr
    for expected in ("'broken'", "stagewise-broken", "0.0.1", BROKEN_ERROR):
        assert expected in warnings[0]
    assert "example  (stagewise-example-plugin" in result.stdout


def test_everything_else_still_works(cli, broken_env):
    listing = {e["name"]: e for e in json.loads(cli("plugins", "--json", env=broken_env).stdout)}
    assert listing["broken"]["error"] == BROKEN_ERROR
    assert listing["example"]["error"] is None and listing["example"]["stages"]
    recipes = json.loads(cli("recipes", "--json", env=broken_env).stdout)
    assert {"stagewise.demo", "example.hard_examples"} <= set(recipes)


def test_strict_mode_makes_it_an_error(cli, broken_env):
    result = cli("plugins", env={**broken_env, "STAGEWISE_STRICT_PLUGINS": "1"}, ok=False)
    assert result.returncode == 1  # an error, as docs/cli.md says: not 2 (a wrong invocation) or a crash
    assert "stagewise-broken" in result.stderr and BROKEN_ERROR in result.stderr


def test_disabled_plugin_is_skipped_silently(cli, broken_env):
    env = {**broken_env, "STAGEWISE_STRICT_PLUGINS": "1", "STAGEWISE_DISABLE_PLUGINS": "broken"}
    result = cli("plugins", "--json", env=env)
    assert result.stderr == ""
    assert "broken" not in {e["name"] for e in json.loads(result.stdout)}


def installed(tmp_path: Path, env: dict[str, str], name: str, source: str) -> dict[str, str]:
    """``env`` with a distribution ``stagewise-NAME 0.0.1`` installed whose entry point NAME is ``source``."""
    site = tmp_path / f"site-{name}"
    info = site / f"stagewise_{name}-0.0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: stagewise-{name}\nVersion: 0.0.1\n")
    (info / "entry_points.txt").write_text(f"[stagewise]\n{name} = stagewise_{name}\n")
    (site / f"stagewise_{name}.py").write_text("import stagewise\n\n\n@stagewise.hookimpl\n" + source)
    return {**env, "PYTHONPATH": os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH")) if p)}


@pytest.mark.parametrize("name, source, error", [
    ("flat", "def stagewise_register_losses(register):\n    register('x:y', name='flat')\n",
     "registration: ValueError: a loss named 'flat': names must be namespaced like 'flat.thing'"),
    ("cmd", "def stagewise_register_commands(cli):\n    raise RuntimeError('boom in commands')\n",
     "stagewise_register_commands: RuntimeError: boom in commands"),
], ids=["unnamespaced-name", "commands-hook-raises"])
def test_a_plugin_broken_in_a_hook_is_one_warning_and_the_commands_work(cli, tmp_path, env_without_strict,
                                                                          name, source, error):
    env = installed(tmp_path, env_without_strict, name, source)
    result = cli("example-hello", "--name", "you", env=env)
    assert result.stderr.splitlines() == [f"stagewise: warning: skipped plugin {name!r} (stagewise-{name} 0.0.1) "
                                          f"failed during {error}"]
    assert "hello, you" in result.stdout
    strict = cli("plugins", env={**env, "STAGEWISE_STRICT_PLUGINS": "1"}, ok=False)
    assert strict.returncode == 1 and "Traceback" in strict.stderr and error in strict.stderr


def test_a_lazy_component_that_fails_to_import_is_a_recipe_error(cli, tmp_path, env_without_strict):
    env = installed(tmp_path, env_without_strict, "lazy",
                    "def stagewise_register_stages(register):\n    register('no_such_module_xyz:S', name='lazy.s')\n")
    (tmp_path / "r.toml").write_text('[model]\nuse = "stagewise.mlp"\n[[stages]]\nname = "s"\nuse = "lazy.s"\n')
    result = cli("run", tmp_path / "r.toml", "--out", tmp_path / "run", env=env, ok=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert ("stages.s.use: 'lazy.s' of plugin 'lazy' (stagewise-lazy) cannot be loaded from 'no_such_module_xyz:S': "
            "ModuleNotFoundError") in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_plugin_claiming_a_core_name_is_told_to_step_aside(cli, tmp_path, env_without_strict):
    env = installed(tmp_path, env_without_strict, "thief",
                    "def stagewise_register_stages(register):\n    register('x:y', name='stagewise.train')\n")
    result = cli("plugins", env=env, ok=False)
    assert result.returncode == 1 and result.stderr.strip().endswith(
        "the name is core's: disable plugin 'thief' with STAGEWISE_DISABLE_PLUGINS=thief "
        "(or uninstall stagewise-thief)")
