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
    assert result.returncode != 0
    assert "stagewise-broken" in result.stderr and BROKEN_ERROR in result.stderr


def test_disabled_plugin_is_skipped_silently(cli, broken_env):
    env = {**broken_env, "STAGEWISE_STRICT_PLUGINS": "1", "STAGEWISE_DISABLE_PLUGINS": "broken"}
    result = cli("plugins", "--json", env=env)
    assert result.stderr == ""
    assert "broken" not in {e["name"] for e in json.loads(result.stdout)}
