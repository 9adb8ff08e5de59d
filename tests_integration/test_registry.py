"""Names across plugins: near misses, plugins that are not installed, every shipped recipe."""

from __future__ import annotations

import pytest

import stagewise
from stagewise import registry
from stagewise.cli.main import main
from stagewise.recipe import load_recipe

NOT_INSTALLED = "nosuchplugin"  # a prefix no installed plugin uses


@pytest.fixture
def known_missing_plugin(monkeypatch):
    assert not any(name.startswith(f"{NOT_INSTALLED}.") for name in stagewise.get_stages())
    monkeypatch.setitem(registry.KNOWN_PLUGINS, NOT_INSTALLED, "stagewise-nosuchplugin")


def test_unknown_name_of_a_known_plugin_says_what_to_install(known_missing_plugin):
    with pytest.raises(stagewise.UnknownNameError) as caught:
        stagewise.get_stage(f"{NOT_INSTALLED}.mine")
    message = str(caught.value)
    assert "pip install stagewise-nosuchplugin" in message
    assert "Installed stages: " in message and "example.mine_hard" in message


def test_recipe_naming_it_fails_with_the_install_hint(known_missing_plugin, tmp_path, capsys):
    recipe = tmp_path / "needs_plugin.toml"
    recipe.write_text(f'[model]\nuse = "stagewise.transformer"\n\n[[stages]]\nname = "mine"\n'
                      f'use = "{NOT_INSTALLED}.mine"\n')
    assert main(["run", str(recipe), "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert str(recipe) in err and "stages.mine.use" in err and "pip install stagewise-nosuchplugin" in err
    assert not (tmp_path / "run").exists()


def test_near_miss_of_an_installed_plugin_suggests_the_name():
    with pytest.raises(stagewise.UnknownNameError) as caught:
        stagewise.get_router("example.loss_quantil")
    assert "did you mean 'example.loss_quantile'?" in str(caught.value)
    assert "pip install" not in str(caught.value)


def test_a_name_of_another_kind_is_told_apart():
    with pytest.raises(stagewise.UnknownNameError, match="a router named 'example.loss_quantile' exists"):
        stagewise.get_stage("example.loss_quantile")


@pytest.mark.parametrize("name", sorted(stagewise.get_recipes()))
def test_every_registered_recipe_validates(name):
    assert load_recipe(name).stages


def test_a_third_party_plain_value_error_is_reported_against_its_table():
    # example.loss_quantile's Options raises a plain ValueError, naming no key: it keeps its table-level
    # report, next to core's keyed problems in the same recipe
    with pytest.raises(stagewise.ConfigError) as info:
        load_recipe("example.hard_examples", ["stages.mine.router.hard_ratio=2.0", "stages.hard.max_epochs=0"])
    assert info.value.problems == ["stages.mine.router: hard_ratio must be between 0 and 1, got 2.0",
                                   "stages.hard.max_epochs: must be >= 1, got 0"]
    with pytest.raises(stagewise.ConfigError) as info:  # with another problem in its table, it waits (as before)
        load_recipe("example.hard_examples", ["stages.mine.router.hard_ratio=2.0", "stages.mine.router.ratio=0.1"])
    (problem,) = info.value.problems
    assert problem.startswith("stages.mine.router.ratio: unknown key")
