"""Plugin discovery: broken plugins are skipped (or raise in strict mode), collisions are errors."""

from __future__ import annotations

import json
import types

import pytest

import stagewise
from stagewise import install, plugins, registry
from stagewise.errors import PluginError, UnknownNameError


class FakeDist:
    def __init__(self, name, version="1.0"):
        self.name, self.version = name, version


class FakeEntryPoint:
    """Stands in for an installed distribution's ``[project.entry-points.stagewise]`` line."""

    def __init__(self, name, module=None, error=None, dist="stagewise-fake"):
        self.name, self.module, self.error, self.dist = name, module, error, FakeDist(dist)

    def load(self):
        if self.error:
            raise self.error
        return self.module


def plugin_module(name, **hooks):
    module = types.ModuleType(name)
    for hook_name, fn in hooks.items():
        setattr(module, hook_name, stagewise.hookimpl(fn))
    return module


@pytest.fixture
def host(monkeypatch):
    """A fresh plugin host whose entry points are the ones a test installs."""
    monkeypatch.setattr(plugins, "_host", plugins._Host())
    for name in ("STAGEWISE_STRICT_PLUGINS", "STAGEWISE_LOAD_PLUGINS", "STAGEWISE_DISABLE_PLUGINS"):
        monkeypatch.delenv(name, raising=False)
    installed: list[FakeEntryPoint] = []
    monkeypatch.setattr(plugins, "entry_points", lambda group: list(installed))
    return installed


def registers_stage(name):
    def stagewise_register_stages(register):
        register("stagewise.builtins.train:TrainStage", name)
    return stagewise_register_stages


def test_broken_plugin_warns_once_and_the_rest_works(host, capsys):
    host.append(FakeEntryPoint("bad", error=RuntimeError("boom"), dist="stagewise-bad"))
    host.append(FakeEntryPoint("good", plugin_module("good", stagewise_register_stages=registers_stage("good.s"))))
    assert stagewise.get_stage("good.s").name == "stagewise.train"
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["stagewise: warning: skipped plugin 'bad' (stagewise-bad 1.0) failed during import: "
                   "RuntimeError: boom"]
    info = {i.name: i for i in plugins.plugin_infos()}
    assert info["bad"].error == "RuntimeError: boom" and info["good"].error is None
    assert info["good"].as_dict()["stages"] == ["good.s"]


def test_strict_mode_raises_with_the_cause(host, monkeypatch):
    monkeypatch.setenv("STAGEWISE_STRICT_PLUGINS", "1")
    host.append(FakeEntryPoint("bad", error=ImportError("no module named x")))
    with pytest.raises(PluginError, match="plugin 'bad' .* failed during import") as info:
        plugins.load_plugins()
    assert isinstance(info.value.__cause__, ImportError)


def test_disable_and_load_only(host, monkeypatch):
    host.append(FakeEntryPoint("a", plugin_module("a", stagewise_register_stages=registers_stage("a.s"))))
    host.append(FakeEntryPoint("b", error=RuntimeError("never loaded")))
    monkeypatch.setenv("STAGEWISE_DISABLE_PLUGINS", "b")
    assert third_party(plugins.plugin_infos()) == ["a"]
    monkeypatch.setattr(plugins, "_host", plugins._Host())
    monkeypatch.setenv("STAGEWISE_LOAD_PLUGINS", "b")
    monkeypatch.setenv("STAGEWISE_DISABLE_PLUGINS", "")
    assert third_party(plugins.plugin_infos()) == ["b"]


def third_party(infos):
    return [i.name for i in infos if i.distribution != "stagewise"]


def test_misspelled_hook_is_caught(host, capsys):
    def stagewise_register_stagess(register):
        pass

    host.append(FakeEntryPoint("typo", plugin_module("typo", stagewise_register_stagess=stagewise_register_stagess)))
    plugins.load_plugins()
    assert "stagewise_register_stagess" in capsys.readouterr().err
    assert plugins.plugin_manager().get_plugin("typo") is None


def test_partly_registered_plugin_is_unregistered(host, capsys):
    def stagewise_register_stages(register):
        register("stagewise.builtins.train:TrainStage", "half.ok")
        raise ValueError("second registration failed")

    host.append(FakeEntryPoint("half", plugin_module("half", stagewise_register_stages=stagewise_register_stages)))
    with pytest.raises(UnknownNameError, match=r"^unknown stage 'half\.ok'"):
        stagewise.get_stage("half.ok")
    assert "ValueError: second registration failed" in capsys.readouterr().err


def test_same_name_twice_names_both_distributions(host):
    host.append(FakeEntryPoint("one", plugin_module("one", stagewise_register_stages=registers_stage("x.s")),
                                dist="stagewise-one"))
    host.append(FakeEntryPoint("two", plugin_module("two", stagewise_register_stages=registers_stage("x.s")),
                                dist="stagewise-two"))
    with pytest.raises(PluginError, match=r"'x.s' is registered twice: by plugin 'one' \(stagewise-one\) "
                                          r"and by plugin 'two' \(stagewise-two\)"):
        plugins.load_plugins()


def test_names_must_be_namespaced(host, capsys, monkeypatch):
    monkeypatch.setenv("STAGEWISE_STRICT_PLUGINS", "1")  # outside strict mode it is skipped: below
    host.append(FakeEntryPoint("flat", plugin_module("flat", stagewise_register_stages=registers_stage("flat"))))
    with pytest.raises(PluginError, match="names must be namespaced"):
        plugins.load_plugins()


def test_a_badly_named_component_skips_its_plugin_outside_strict_mode(host, capsys):
    host.append(FakeEntryPoint("flat", plugin_module("flat", stagewise_register_stages=registers_stage("flat")),
                               dist="stagewise-flat"))
    host.append(FakeEntryPoint("good", plugin_module("good", stagewise_register_stages=registers_stage("good.s"))))
    assert stagewise.get_stage("good.s").name == "stagewise.train"
    assert capsys.readouterr().err.splitlines() == [
        "stagewise: warning: skipped plugin 'flat' (stagewise-flat 1.0) failed during registration: "
        "ValueError: a stage named 'flat': names must be namespaced like 'flat.thing'"]
    errors = {i.name: i.error for i in plugins.plugin_infos()}
    assert errors["flat"] == "ValueError: a stage named 'flat': names must be namespaced like 'flat.thing'"


def test_a_plugin_claiming_a_core_name_is_the_one_to_disable(host):
    host.append(FakeEntryPoint("thief", plugin_module("thief", stagewise_register_stages=registers_stage(
        "stagewise.train")), dist="stagewise-thief"))
    with pytest.raises(PluginError) as info:
        plugins.load_plugins()
    assert str(info.value).endswith("the name is core's: disable plugin 'thief' with "
                                    "STAGEWISE_DISABLE_PLUGINS=thief (or uninstall stagewise-thief)")


def test_a_lazy_entry_that_fails_to_import_names_its_plugin(host):
    def stagewise_register_stages(register):
        register("no_such_module_xyz:Stage", "lazy.stage")

    host.append(FakeEntryPoint("lazy", plugin_module("lazy", stagewise_register_stages=stagewise_register_stages),
                               dist="stagewise-lazy"))
    with pytest.raises(PluginError, match=r"'lazy.stage' of plugin 'lazy' \(stagewise-lazy\) cannot be loaded "
                                          r"from 'no_such_module_xyz:Stage': ModuleNotFoundError") as info:
        stagewise.get_stage("lazy.stage")
    assert isinstance(info.value.__cause__, ModuleNotFoundError)


def test_a_failing_register_commands_hook_skips_only_its_plugin(host, monkeypatch, capsys):
    from stagewise.cli.main import main

    def stagewise_register_commands(cli):
        cli.add_parser("half-added")
        raise RuntimeError("boom in commands")

    host.append(FakeEntryPoint("cmd", plugin_module("cmd", stagewise_register_commands=stagewise_register_commands,
                                                    stagewise_register_stages=registers_stage("cmd.s")),
                               dist="stagewise-cmd"))
    assert main(["plugins"]) == 0
    out, err = capsys.readouterr()
    assert err.splitlines() == ["stagewise: warning: skipped plugin 'cmd' (stagewise-cmd 1.0) failed during "
                                "stagewise_register_commands: RuntimeError: boom in commands"]
    assert "cmd.s" not in out  # the plugin is taken out, as when it fails to load
    with pytest.raises(SystemExit) as info:  # the subcommand it added before failing is taken out again
        main(["half-added"])
    assert info.value.code == 2 and "invalid choice: 'half-added'" in capsys.readouterr().err
    monkeypatch.setenv("STAGEWISE_STRICT_PLUGINS", "1")
    monkeypatch.setattr(plugins, "_host", plugins._Host())
    assert main(["plugins"]) == 1
    assert "boom in commands (STAGEWISE_STRICT_PLUGINS is set)" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--help"], ["half-added"]])
def test_a_failing_register_commands_hook_leaves_no_half_added_command(host, capsys, argv):
    # checked in the same parse as the failure: later parses no longer call the unregistered plugin
    from stagewise.cli.main import main

    def stagewise_register_commands(cli):
        cli.add_parser("half-added", help="added before the failure")
        raise RuntimeError("boom in commands")

    host.append(FakeEntryPoint("cmd", plugin_module("cmd", stagewise_register_commands=stagewise_register_commands)))
    with pytest.raises(SystemExit) as info:
        main(argv)
    out, err = capsys.readouterr()
    assert "half-added" not in out and "boom in commands" in err
    if argv == ["half-added"]:
        assert info.value.code == 2 and "invalid choice: 'half-added'" in err


def test_unknown_name_suggests_the_package_to_install(host, monkeypatch):
    # a known plugin whose distribution is not installed (lego-ashem may be, in a development venv)
    monkeypatch.setitem(registry.KNOWN_PLUGINS, "nosuch", "stagewise-nosuch")
    with pytest.raises(UnknownNameError) as info:
        stagewise.get_stage("nosuch.mine")
    assert "pip install stagewise-nosuch" in str(info.value)
    assert "Installed stages: stagewise.evaluate, stagewise.train" in str(info.value)


def test_a_plugin_in_this_checkout_is_installed_from_its_folder(host, monkeypatch, tmp_path):
    # the plugins are not on the package index: from a checkout, the hint names the folder and the pins
    (tmp_path / "packages" / "stagewise-nosuch").mkdir(parents=True)
    (tmp_path / "packages" / "stagewise-nosuch" / "pyproject.toml").write_text("")
    (tmp_path / "constraints.txt").write_text("")
    monkeypatch.setattr(install, "CHECKOUT_PACKAGES", tmp_path / "packages")
    monkeypatch.setitem(registry.KNOWN_PLUGINS, "nosuch", "stagewise-nosuch")
    with pytest.raises(UnknownNameError) as info:
        stagewise.get_stage("nosuch.mine")
    pins, folder = tmp_path / "constraints.txt", tmp_path / "packages" / "stagewise-nosuch"
    assert f"not installed: pip install -c {pins} -e {folder}. Installed stages:" in str(info.value)


def test_an_extra_is_installed_from_the_checkout_or_the_index(monkeypatch, tmp_path):
    monkeypatch.setattr(install, "CHECKOUT_PACKAGES", tmp_path / "my checkout" / "packages")
    assert install.install_command("stagewise", "plots") == "pip install 'stagewise[plots]'"
    (tmp_path / "my checkout" / "packages" / "stagewise").mkdir(parents=True)
    (tmp_path / "my checkout" / "packages" / "stagewise" / "pyproject.toml").write_text("")
    (tmp_path / "my checkout" / "constraints.txt").write_text("")
    checkout = tmp_path / "my checkout"
    assert install.install_command("stagewise", "plots") == (
        f"pip install -c '{checkout}/constraints.txt' -e '{checkout}/packages/stagewise[plots]'")


def test_a_known_plugin_installed_but_not_loaded_is_not_told_to_install(host, monkeypatch):
    # as when STAGEWISE_DISABLE_PLUGINS leaves it out: its distribution (here: core's own) is installed
    monkeypatch.setitem(registry.KNOWN_PLUGINS, "phantom", "stagewise")
    with pytest.raises(UnknownNameError) as info:
        stagewise.get_stage("phantom.mine")
    assert "stagewise, which is installed but was not loaded" in str(info.value)
    assert "pip install" not in str(info.value)


def test_unknown_name_tells_near_misses_of_another_kind(host):
    message = r"unknown stage 'stagewise.mse' \(a loss named 'stagewise.mse' exists\)"
    with pytest.raises(UnknownNameError, match=message):
        stagewise.get_stage("stagewise.mse")


def test_registration_is_lazy(host):
    import sys

    plugins.load_plugins()
    entry = plugins.registries()["stages"].entries["stagewise.train"]
    assert entry.lazy and isinstance(entry.target, str)
    assert stagewise.get_stage("stagewise.train") is sys.modules["stagewise.builtins.train"].TrainStage
    assert not entry.lazy


def test_trace_prints_hook_calls(host, monkeypatch, capsys):
    monkeypatch.setenv("STAGEWISE_TRACE_PLUGINS", "1")
    plugins.load_plugins()
    assert "stagewise: trace: stagewise_register_stages" in capsys.readouterr().err


def test_public_api_is_complete():
    for name in stagewise.__all__:
        assert getattr(stagewise, name) is not None, name


def test_type_checkers_see_each_lazy_name_as_what_it_loads():
    """The lazy names are Any to a type checker unless ``__init__`` imports them under TYPE_CHECKING too;
    a name missing there would leave the plugins' uses of it unchecked."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(stagewise))
    (block,) = [node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"]
    typed = {(node.module, alias.name) for node in block.body if isinstance(node, ast.ImportFrom)
             for alias in node.names}
    assert typed == {(module, name) for name, module in stagewise._LAZY.items()}


def test_plugins_table_shows_core_first_then_errors_registrations_and_hooks(host, capsys):
    from stagewise.cli.main import main

    def stagewise_register_commands(cli):
        pass

    def stagewise_after_run(state):
        pass

    host.append(FakeEntryPoint("zeta", error=RuntimeError("boom"), dist="stagewise-zeta"))
    host.append(FakeEntryPoint("aaa", plugin_module("aaa", stagewise_register_stages=registers_stage("aaa.s"),
                                                    stagewise_register_commands=stagewise_register_commands,
                                                    stagewise_after_run=stagewise_after_run)))
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"stagewise  (stagewise {stagewise.__version__})"  # core first, though 'aaa' sorts before
    aaa = out.index("aaa  (stagewise-fake 1.0)")
    assert out[aaa + 1:aaa + 3] == ["  stages: aaa.s", "  hooks: after_run, register_commands"]
    zeta = out.index("zeta  (stagewise-zeta 1.0)")
    assert out[zeta + 1] == "  error: RuntimeError: boom"

    assert main(["plugins", "--json"]) == 0
    infos = {i["name"]: i for i in json.loads(capsys.readouterr().out)}
    assert list(infos) == ["stagewise", "aaa", "stagewise.curves", "stagewise.tensorboard", "zeta"]
    assert infos["aaa"]["hooks"] == ["stagewise_after_run", "stagewise_register_commands"]  # not the register_*
    assert infos["stagewise.curves"]["distribution"] == "stagewise"  # core's event plugins, named as core's
    assert infos["stagewise.curves"]["hooks"] == ["stagewise_after_run"]


def test_recipes_are_listed_by_name_with_their_distribution(host, capsys, tmp_path):
    from stagewise.cli.main import main

    def stagewise_register_recipes(register):
        register(tmp_path / "z.toml", "mine.zulu")
        register(tmp_path / "a.toml", "mine.alpha")

    host.append(FakeEntryPoint("mine", plugin_module("mine", stagewise_register_recipes=stagewise_register_recipes),
                               dist="stagewise-mine"))
    assert main(["recipes"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert rows == [["mine.alpha", "stagewise-mine"], ["mine.zulu", "stagewise-mine"], ["stagewise.demo", "stagewise"]]
    assert main(["recipes", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert list(listed) == ["mine.alpha", "mine.zulu", "stagewise.demo"]
    assert listed["mine.zulu"] == str(tmp_path / "z.toml") and listed["stagewise.demo"].endswith("demo.toml")


def test_plugin_lists_in_the_environment_may_have_spaces(host, monkeypatch):
    host.append(FakeEntryPoint("a", plugin_module("a", stagewise_register_stages=registers_stage("a.s"))))
    host.append(FakeEntryPoint("b", error=RuntimeError("never loaded")))
    host.append(FakeEntryPoint("c", error=RuntimeError("never loaded")))
    monkeypatch.setenv("STAGEWISE_DISABLE_PLUGINS", " b , c ")
    assert third_party(plugins.plugin_infos()) == ["a"]


def test_zero_turns_strict_mode_and_tracing_off(host, monkeypatch, capsys):
    monkeypatch.setenv("STAGEWISE_STRICT_PLUGINS", "0")
    monkeypatch.setenv("STAGEWISE_TRACE_PLUGINS", "0")
    host.append(FakeEntryPoint("bad", error=RuntimeError("boom")))
    plugins.load_plugins()  # a warning, not an error
    assert capsys.readouterr().err.splitlines() == [
        "stagewise: warning: skipped plugin 'bad' (stagewise-fake 1.0) failed during import: RuntimeError: boom"]


def test_plugins_load_in_name_order_whatever_the_discovery_order(host):
    host.append(FakeEntryPoint("two", plugin_module("two", stagewise_register_stages=registers_stage("x.s"))))
    host.append(FakeEntryPoint("one", plugin_module("one", stagewise_register_stages=registers_stage("x.s"))))
    with pytest.raises(PluginError, match=r"by plugin 'one' \(stagewise-fake\) and by plugin 'two' \(stagewise-fake\); "
                                          r"disable one with STAGEWISE_DISABLE_PLUGINS=one or "
                                          r"STAGEWISE_DISABLE_PLUGINS=two$"):
        plugins.load_plugins()


def test_a_late_plugin_claiming_a_core_name_is_taken_out_whole(host):
    def stagewise_register_stages(register):
        register("stagewise.builtins.train:TrainStage", "late.ok")
        register("stagewise.builtins.train:TrainStage", "stagewise.train")  # core registered it first

    plugins.load_plugins()
    with pytest.raises(PluginError) as info:
        plugins.register_plugin(plugin_module("late", stagewise_register_stages=stagewise_register_stages),
                                "late", "stagewise-late")
    assert str(info.value).endswith("the name is core's: disable plugin 'late' with STAGEWISE_DISABLE_PLUGINS=late "
                                    "(or uninstall stagewise-late)")
    assert plugins.plugin_manager().get_plugin("late") is None
    with pytest.raises(UnknownNameError, match=r"^unknown stage 'late\.ok'"):  # what it registered first is gone too
        stagewise.get_stage("late.ok")
    assert stagewise.get_stage("stagewise.train").name == "stagewise.train"  # core's entry untouched


def test_unregistering_a_plugin_drops_it_from_the_listing(host):
    plugins.register_plugin(plugin_module("temp", stagewise_register_stages=registers_stage("temp.s")), "temp")
    assert "temp" in [i.name for i in plugins.plugin_infos()]
    plugins.unregister_plugin("temp")
    assert "temp" not in [i.name for i in plugins.plugin_infos()]


@pytest.mark.parametrize("name", ["flat.", ".flat"])
def test_a_dot_at_either_end_is_not_a_namespace(host, capsys, name):
    host.append(FakeEntryPoint("flat", plugin_module("flat", stagewise_register_stages=registers_stage(name))))
    plugins.load_plugins()
    assert "names must be namespaced like 'flat.thing'" in capsys.readouterr().err
    assert name not in plugins.registries()["stages"].entries


def test_a_recipe_string_with_a_colon_is_a_path_not_a_lazy_import(host):
    def stagewise_register_recipes(register):
        register("C:/recipes/x.toml", "win.recipe")  # a Windows path, not "module:attribute"

    host.append(FakeEntryPoint("win", plugin_module("win", stagewise_register_recipes=stagewise_register_recipes)))
    assert plugins.get("recipes", "win.recipe") == "C:/recipes/x.toml"


def test_a_lazy_target_written_with_a_dot_for_the_colon_skips_its_plugin(host, capsys):
    def stagewise_register_losses(register):
        register("dotted.loss.L1", "dotted.l1")  # meant "dotted.loss:L1"; was kept as the loss itself

    host.append(FakeEntryPoint("dotted", plugin_module("dotted", stagewise_register_losses=stagewise_register_losses),
                               dist="stagewise-dotted"))
    plugins.load_plugins()
    assert capsys.readouterr().err.splitlines() == [
        "stagewise: warning: skipped plugin 'dotted' (stagewise-dotted 1.0) failed during registration: "
        "ValueError: loss 'dotted.l1' is registered as the string 'dotted.loss.L1'; give the class, or a lazy "
        "'module:Class' string such as 'dotted.loss:L1'"]
    assert "dotted.l1" not in plugins.registries()["losses"].entries


def test_a_lazy_target_may_name_a_nested_attribute(host):
    def stagewise_register_models(register):  # a model: an Options class is no stage (see test_a_lazy_target_...)
        register("stagewise.builtins.train:TrainStage.Options", "nested.options")

    host.append(FakeEntryPoint("nested", plugin_module("nested", stagewise_register_models=stagewise_register_models)))
    from stagewise.builtins.train import TrainStage

    assert plugins.get("models", "nested.options") is TrainStage.Options


def test_a_known_plugin_that_is_loaded_gets_no_install_hint(host, monkeypatch):
    # its prefix has names: a typo in a name, not a missing package
    monkeypatch.setitem(registry.KNOWN_PLUGINS, "good", "stagewise-good-not-installed")
    host.append(FakeEntryPoint("good", plugin_module("good", stagewise_register_stages=registers_stage("good.s"))))
    with pytest.raises(UnknownNameError) as info:
        stagewise.get_stage("good.t")
    assert "pip install" not in str(info.value) and "did you mean 'good.s'? Installed stages:" in str(info.value)


def test_an_empty_kind_is_listed_as_none(host):
    with pytest.raises(UnknownNameError, match=r"unknown router 'x.y'\. Installed routers: none$"):
        plugins.get("routers", "x.y")  # core registers no routers


def test_an_unknown_top_level_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="module 'stagewise' has no attribute 'Nope'"):
        stagewise.Nope  # noqa: B018
    assert not hasattr(stagewise, "Nope")


@pytest.mark.parametrize("kind, target, what", [
    ("losses", "stagewise.builtins.losses:prediction", "a function"),  # a function where a Loss class belongs
    ("stages", "stagewise.builtins.train:TrainStage.Options", "the class TrainOptions"),
    ("routers", "stagewise.builtins.losses:CrossEntropy", "the class CrossEntropy")])
def test_a_lazy_target_that_is_not_its_kinds_class_names_the_base_class(host, kind, target, what):
    def register_it(register):
        register(target, "odd.thing")

    host.append(FakeEntryPoint("odd", plugin_module("odd", **{f"stagewise_register_{kind}": register_it}),
                               dist="stagewise-odd"))
    base = {"losses": "Loss", "stages": "Stage", "routers": "Router"}[kind]
    with pytest.raises(PluginError) as info:
        plugins.get(kind, "odd.thing")  # used to resolve, to fail at use: 'NoOptions' object has no attribute
    assert str(info.value) == (
        f"{registry.singular(kind)} 'odd.thing' of plugin 'odd' (stagewise-odd) is registered as {target!r}, "
        f"which is {what}, not a subclass of stagewise.{base}; the plugin must register a class that subclasses "
        f"stagewise.{base} (report this to its authors)")


@pytest.mark.parametrize("entry_point, env, why", [
    (FakeEntryPoint("act", error=ImportError("no module named 'numpyy'"), dist="stagewise-act"), {},
     "failed to load: ImportError: no module named 'numpyy'"),
    (FakeEntryPoint("act", plugin_module("act", stagewise_register_losses=lambda register: 1 / 0),
                    dist="stagewise-act"), {}, "failed to load: ZeroDivisionError: division by zero"),
    (FakeEntryPoint("act", plugin_module("act"), dist="stagewise-act"), {"STAGEWISE_DISABLE_PLUGINS": "act"},
     "is disabled by STAGEWISE_DISABLE_PLUGINS=act"),
    (FakeEntryPoint("act", plugin_module("act"), dist="stagewise-act"), {"STAGEWISE_LOAD_PLUGINS": "stagewise"},
     "is left out by STAGEWISE_LOAD_PLUGINS=stagewise")], ids=["import", "register-hook", "disabled", "load-only"])
def test_an_unknown_name_of_a_skipped_plugin_says_why_it_was_skipped(host, monkeypatch, capsys, entry_point, env, why):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    host.append(entry_point)
    with pytest.raises(UnknownNameError) as info:
        plugins.get("losses", "act.activation_l2")
    assert str(info.value).startswith(f"unknown loss 'act.activation_l2'; the plugin 'act' (stagewise-act 1.0) "
                                      f"{why}. Installed losses: ")


def test_a_short_name_suggests_the_registered_names_ending_in_it(host):
    def stagewise_register_recipes(register):
        register("/recipes/l2.toml", "act.l2")
        register("/recipes/l1.toml", "act.l1")

    host.append(FakeEntryPoint("act", plugin_module("act", stagewise_register_recipes=stagewise_register_recipes)))
    for typed, meant in (("l2", "act.l2"), ("demoo", "stagewise.demo")):  # exact, and near, short names
        with pytest.raises(UnknownNameError, match=rf"unknown recipe '{typed}'; did you mean '{meant}'\? Installed"):
            plugins.get("recipes", typed)


@pytest.mark.parametrize("where", ["import", "registration"])
def test_a_plugin_that_calls_sys_exit_is_skipped_not_the_end_of_every_command(host, capsys, where):
    def stagewise_register_stages(register):
        raise SystemExit("needs CUDA")

    error = SystemExit("needs CUDA") if where == "import" else None  # was: every command exited with "needs CUDA"
    host.append(FakeEntryPoint("quits", plugin_module("quits", stagewise_register_stages=stagewise_register_stages),
                               error=error, dist="stagewise-quits"))
    host.append(FakeEntryPoint("good", plugin_module("good", stagewise_register_stages=registers_stage("good.s"))))
    assert stagewise.get_stage("good.s").name == "stagewise.train"
    assert capsys.readouterr().err == (f"stagewise: warning: skipped plugin 'quits' (stagewise-quits 1.0) failed "
                                       f"during {where}: SystemExit: needs CUDA\n")


def test_strict_mode_raises_for_a_plugin_that_calls_sys_exit(host, monkeypatch):
    monkeypatch.setenv("STAGEWISE_STRICT_PLUGINS", "1")
    host.append(FakeEntryPoint("quits", error=SystemExit(3)))
    with pytest.raises(PluginError, match="plugin 'quits' .* failed during import: SystemExit: 3") as info:
        plugins.load_plugins()
    assert isinstance(info.value.__cause__, SystemExit)


@pytest.mark.parametrize("kind, obj, what, base", [
    ("stages", 42, "a int", "Stage"),
    ("losses", len, "a builtin_function_or_method", "Loss"),
    ("routers", dict, "the class dict", "Router"),
])
def test_a_registered_object_that_is_not_its_kinds_class_skips_the_plugin(host, capsys, kind, obj, what, base):
    def register_it(register):
        register(obj, "odd.thing")

    host.append(FakeEntryPoint("odd", plugin_module("odd", **{f"stagewise_register_{kind}": register_it}),
                               dist="stagewise-odd"))
    # was registered, to fail as a recipe used it: "TypeError: 'int' object is not callable", a traceback
    with pytest.raises(UnknownNameError, match="the plugin 'odd' .* failed to load"):
        plugins.get(kind, "odd.thing")
    assert capsys.readouterr().err == (
        f"stagewise: warning: skipped plugin 'odd' (stagewise-odd 1.0) failed during registration: ValueError: "
        f"{registry.singular(kind)} 'odd.thing' is registered as {obj!r}, which is {what}, not a subclass of "
        f"stagewise.{base}; register a class that subclasses stagewise.{base}\n")


@pytest.mark.parametrize(("kind", "one"), [("stages", "stage"), ("routers", "router"), ("losses", "loss"),
                                           ("models", "model"), ("datasets", "dataset"), ("recipes", "recipe")])
def test_each_registry_getter_returns_what_its_listing_holds(kind, one):
    listing, get = getattr(stagewise, f"get_{kind}")(), getattr(stagewise, f"get_{one}")
    assert all(get(name) == value for name, value in listing.items())  # core registers no router: empty
    with pytest.raises(UnknownNameError, match=f"^unknown {one} 'no.such'"):
        get("no.such")
