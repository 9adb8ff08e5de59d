"""A bug in a run keeps its traceback, with a note naming where the engine was, what it called
there and the plugin to report it to: in a stage's run, and in the plugin code it calls around it."""

from __future__ import annotations

import shutil
import types
from dataclasses import dataclass

import pytest

import stagewise
from stagewise import plugins
from stagewise.cli.main import main
from stagewise.engine.runner import run_recipe

PLUGIN = "stagewise-buggy 0.3: report it to that plugin"


def _bug(*args, **kwargs):
    raise IndexError("a plugin's bug")


class BadCheck(stagewise.Loss):
    """A plugin's term whose check has a bug."""

    name = "testing.badcheck"

    def check(self, model_options):
        return _bug()

    def forward(self, outputs, batch, state):
        return outputs["logits"].mean()


class BadStage(stagewise.Stage):
    """A plugin's stage whose check has a bug."""

    name = "testing.badstage"

    @dataclass
    class Options:
        split: str = "test"  # the key of the stagewise.evaluate stage it replaces

    def check(self, recipe, index, data):
        return _bug()

    def run(self, state):
        return {}


class BadModel:
    """A plugin's model whose factory has a bug."""

    @classmethod
    def from_recipe(cls, options, data):
        return _bug()


def _plugin(hook: str | None) -> types.ModuleType:
    """The plugin: its components, and ``hook`` (an event hook's name) with a bug."""
    module = types.ModuleType(__name__)  # the plugin's module: this file's code is the plugin's
    module.stagewise_register_losses = stagewise.hookimpl(lambda register: register(BadCheck))
    module.stagewise_register_stages = stagewise.hookimpl(lambda register: register(BadStage))
    module.stagewise_register_models = stagewise.hookimpl(lambda register: register(BadModel, "testing.badmodel"))
    if hook is not None:
        setattr(module, hook, stagewise.hookimpl(specname=hook)(lambda state: _bug()))
    return module


@pytest.mark.parametrize("hook, overrides, note", [
    ("stagewise_before_run", [], f"in run 'tiny' (stagewise_before_run hook of plugin 'testing_buggy'), from {PLUGIN}"),
    ("stagewise_after_run", [], f"in run 'tiny' (stagewise_after_run hook of plugin 'testing_buggy'), from {PLUGIN}"),
    ("stagewise_before_stage", [],
     f"in stage 'phase1' (stagewise_before_stage hook of plugin 'testing_buggy'), from {PLUGIN}"),
    ("stagewise_after_stage", [],
     f"in stage 'phase1' (stagewise_after_stage hook of plugin 'testing_buggy'), from {PLUGIN}"),
    ("stagewise_after_step", [],  # in the stage's run: was "(stagewise.train)", without the hook
     f"in stage 'phase1' (stagewise_after_step hook of plugin 'testing_buggy'), from {PLUGIN}"),
    (None, ['stages.phase1.losses=[{use="testing.badcheck"}]'],
     f"checking stage 'phase1' (testing.badcheck term of stagewise.train), from {PLUGIN}"),
    (None, ['stages.test.use="testing.badstage"'], f"checking stage 'test' (testing.badstage), from {PLUGIN}"),
    (None, ['model={use="testing.badmodel"}', "stages.phase2.grow={}"],
     f"building the model (testing.badmodel), from {PLUGIN}"),
], ids=["before-run", "after-run", "before-stage", "after-stage", "after-step", "term-check", "stage-check",
        "model"])
def test_a_plugins_bug_around_a_stage_gets_a_note_naming_the_hook_and_the_plugin(tiny, tmp_path, hook, overrides,
                                                                                   note):
    plugins.register_plugin(_plugin(hook), "testing_buggy", "stagewise-buggy", "0.3")
    try:
        with pytest.raises(IndexError, match="a plugin's bug") as info:
            run_recipe(tiny("stages.phase1.max_epochs=1", *overrides), out=tmp_path / "run", quiet=True)
    finally:
        plugins.unregister_plugin("testing_buggy")
    assert info.value.__notes__ == [note]


def test_a_bug_in_cores_own_hook_names_the_hook_but_claims_no_plugin(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr("stagewise.builtins.curves.PLOTS", None)  # core's curves plot: "None is not iterable"
    plugins.register_plugin(_plugin(None), "testing_buggy", "stagewise-buggy", "0.3")  # installed, not involved
    try:
        with pytest.raises(TypeError) as info:
            run_recipe(tiny("stages.phase1.max_epochs=1"), out=tmp_path / "run", quiet=True)
    finally:
        plugins.unregister_plugin("testing_buggy")
    assert info.value.__notes__ == ["in run 'tiny' (stagewise_after_run hook of plugin 'stagewise.curves')"]


class FileStage(stagewise.Stage):
    """A plugin's stage whose file handling the file system refuses: its own (``own``), or core's,
    a checkpoint it asks core to write where the run's checkpoints folder has become a file."""

    name = "testing.files"

    @dataclass
    class Options:
        own: bool = True

    def run(self, state):
        if self.options.own:
            (state.run_dir.path / "missing" / "cache.npy").read_bytes()
        shutil.rmtree(state.run_dir.checkpoints)
        state.run_dir.checkpoints.write_text("")
        state.save_checkpoint(done=False)
        return {}


def _run_file_stage(tiny_recipe_path, tmp_path, own: bool) -> int:
    module = types.ModuleType(__name__)  # the plugin's module: this file's code is the plugin's
    module.stagewise_register_stages = stagewise.hookimpl(lambda register: register(FileStage))
    plugins.register_plugin(module, "testing_files", "stagewise-files", "0.2")
    try:
        return main(["run", str(tiny_recipe_path), "--out", str(tmp_path / "run"), "--quiet",
                     "--set", f'stages=[{{name="io", use="testing.files", own={str(own).lower()}}}]'])
    finally:
        plugins.unregister_plugin("testing_files")


def test_an_os_error_in_a_plugins_own_code_is_a_bug_with_its_traceback_and_note(tiny_recipe_path, tmp_path, capsys):
    # was the one line "stagewise: error: .../cache.npy: No such file or directory; check the path"
    with pytest.raises(FileNotFoundError) as info:
        _run_file_stage(tiny_recipe_path, tmp_path, own=True)
    assert info.value.__notes__ == ["in stage 'io' (testing.files), from stagewise-files 0.2: report it to that plugin"]
    assert "stagewise: error" not in capsys.readouterr().err


def test_an_os_error_in_cores_file_handling_for_a_plugin_stays_one_line(tiny_recipe_path, tmp_path, capsys):
    assert _run_file_stage(tiny_recipe_path, tmp_path, own=False) == 1
    folder = tmp_path / "run" / "checkpoints"
    assert capsys.readouterr().err == f"stagewise: error: {folder}: File exists; check the path\n"


def _command_plugin(add=None, handler=_bug) -> types.ModuleType:
    """A plugin adding the command ``buggy`` (``add``: its own way, e.g. a buggy one) whose handler is ``handler``."""
    module = types.ModuleType(__name__)  # the plugin's module: this file's code is the plugin's
    module.stagewise_register_commands = stagewise.hookimpl(
        add or (lambda cli: cli.add_parser("buggy").set_defaults(handler=handler)))
    return module


def test_a_bug_in_a_plugins_command_gets_a_note_naming_the_command_and_the_plugin():
    plugins.register_plugin(_command_plugin(), "testing_buggy", "stagewise-buggy", "0.3")
    try:
        with pytest.raises(IndexError, match="a plugin's bug") as info:  # main lets it through: its traceback
            main(["buggy"])
    finally:
        plugins.unregister_plugin("testing_buggy")
    assert info.value.__notes__ == [f"in command 'buggy', from {PLUGIN}"]  # was: no note


def test_a_bug_in_a_plugins_argument_parsing_gets_a_note_naming_the_plugin():
    def add(cli):  # argparse calls the plugin's type= while parsing, before any handler runs
        cli.add_parser("buggy").add_argument("size", type=_bug)

    plugins.register_plugin(_command_plugin(add=add), "testing_buggy", "stagewise-buggy", "0.3")
    try:
        with pytest.raises(IndexError, match="a plugin's bug") as info:
            main(["buggy", "3"])
    finally:
        plugins.unregister_plugin("testing_buggy")
    assert info.value.__notes__ == [f"parsing the command line, from {PLUGIN}"]  # was: no note


def test_a_bug_adding_a_plugins_command_gets_the_note_strict_mode_shows(monkeypatch, capsys):
    monkeypatch.setenv("STAGEWISE_STRICT_PLUGINS", "1")
    plugins.register_plugin(_command_plugin(add=_bug), "testing_buggy", "stagewise-buggy", "0.3")
    try:
        assert main(["plugins"]) == 1
    finally:
        plugins.unregister_plugin("testing_buggy")
    err = capsys.readouterr().err
    assert f"adding commands (stagewise_register_commands hook of plugin 'testing_buggy'), from {PLUGIN}\n" in err
    assert "IndexError: a plugin's bug" in err and err.endswith("(STAGEWISE_STRICT_PLUGINS is set)\n")


def test_a_bug_in_a_core_command_names_the_command_but_claims_no_plugin(monkeypatch):
    monkeypatch.setattr(plugins, "plugin_infos", lambda: [None])  # core's `stagewise plugins` then reads None.name
    plugins.register_plugin(_command_plugin(), "testing_buggy", "stagewise-buggy", "0.3")  # installed, not involved
    try:
        with pytest.raises(AttributeError) as info:
            main(["plugins"])
    finally:
        plugins.unregister_plugin("testing_buggy")
    assert info.value.__notes__ == ["in command 'plugins'"]


def test_a_bug_in_a_plugins_model_loaded_from_a_checkpoint_gets_a_note(tiny, tmp_path):
    from stagewise.engine.checkpoint import load_checkpoint, write_checkpoint

    run = run_recipe(tiny("stages.phase1.max_epochs=1"), out=tmp_path / "run", quiet=True)
    saved = load_checkpoint(run / "checkpoints" / "last.pt")
    saved["recipe"]["model"], saved["model_options"] = {"use": "testing.badmodel"}, {}  # the plugin's model
    del saved["format"]  # write_checkpoint adds it
    checkpoint = tmp_path / "plugins.pt"
    write_checkpoint(saved, [checkpoint])
    plugins.register_plugin(_plugin(None), "testing_buggy", "stagewise-buggy", "0.3")
    try:
        with pytest.raises(IndexError, match="a plugin's bug") as info:
            stagewise.load_model(checkpoint)
    finally:
        plugins.unregister_plugin("testing_buggy")
    assert info.value.__notes__ == [f"rebuilding the model of {checkpoint} (testing.badmodel), from {PLUGIN}"]
