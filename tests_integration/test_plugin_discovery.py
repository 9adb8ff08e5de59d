"""The example plugin is found through its entry point, and listing plugins stays light."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import version

import stagewise

LISTING_KEYS = {"name", "distribution", "version", "stages", "routers", "losses", "models", "datasets",
                "recipes", "error"}


def test_plugins_json_lists_the_example_plugin(cli):
    listing = json.loads(cli("plugins", "--json").stdout)
    assert isinstance(listing, list)
    for entry in listing:
        assert LISTING_KEYS <= set(entry), entry
    by_name = {entry["name"]: entry for entry in listing}
    example = {k: by_name["example"][k] for k in LISTING_KEYS}
    assert example == {
        "name": "example",
        "distribution": "stagewise-example-plugin",
        "version": version("stagewise-example-plugin"),
        "stages": ["example.mine_hard", "example.train_hard"],
        "routers": ["example.loss_quantile"],
        "losses": ["example.entropy_bonus"],
        "models": [],
        "datasets": [],
        "recipes": ["example.hard_examples"],
        "error": None,
    }
    assert by_name["stagewise"]["error"] is None


def test_plugins_table_names_the_distribution(cli):
    assert "example  (stagewise-example-plugin " in cli("plugins").stdout


def test_listing_plugins_does_not_import_torch():
    code = ("import sys; from stagewise.cli.main import main; main(['plugins']); "
            "assert 'torch' not in sys.modules, 'listing plugins imported torch'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_version(cli):
    assert cli("--version").stdout.strip() == f"stagewise {stagewise.__version__}"


def test_plugin_adds_a_subcommand(cli):
    assert "example-hello" in cli("--help").stdout
    assert cli("example-hello", "--name", "tests").stdout.startswith("hello, tests, from stagewise-example-plugin")


def test_public_registry_resolves_the_lazy_entries():
    assert issubclass(stagewise.get_stage("example.train_hard"), stagewise.TrainStage)
    assert issubclass(stagewise.get_router("example.loss_quantile"), stagewise.Router)
    assert issubclass(stagewise.get_loss("example.entropy_bonus"), stagewise.Loss)
