"""Recipe validation: every problem at once, with file, key path and valid choices."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from conftest import CLASSES

from stagewise.errors import ConfigError
from stagewise.recipe import load_recipe, recipe_from_table
from stagewise.tomlwrite import dumps


def problems_of(tmp_path, text: str, overrides=()) -> list[str]:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_recipe(path, list(overrides))
    assert str(path) in str(info.value)
    return info.value.problems


def test_three_mistakes_are_three_problems(tmp_path):
    problems = problems_of(tmp_path, """
[run]
seed = "seven"
[model]
use = "stagewise.transformer"
n_layers = 2
[[stages]]
name = "a"
use = "stagewise.trian"
""")
    assert len(problems) == 3
    assert problems[0].startswith("run.seed: expected int, got str 'seven'")
    assert "model.n_layers: unknown key; did you mean 'n_layer'?" in problems[1]
    assert "Valid keys:" in problems[1] and "n_embd" in problems[1]
    assert "stages.a.use: unknown stage 'stagewise.trian'; did you mean 'stagewise.train'?" in problems[2]
    assert "Installed stages: stagewise.evaluate, stagewise.train" in problems[2]


def test_invalid_choice_lists_the_choices(tmp_path):
    (problem,) = problems_of(tmp_path, """
[model]
use = "stagewise.transformer"
[[stages]]
name = "a"
optimizer = "adam"
""")
    assert problem == ("stages.a.optimizer: 'adam' is not one of the valid choices: 'adamw', 'sgd', 'lbfgs'; "
                       "did you mean 'adamw'?")


@pytest.mark.parametrize(("value", "hint"), [
    ('"BF16"', "; did you mean 'bf16'?"),  # a choice in other case
    ('"fp16"', "; did you mean 'bf16'?"),  # the half precision that is offered
    ('"float64"', ""),  # nothing close: the choices alone
    ("16", ""),  # not a string
])
def test_invalid_choice_suggests_the_closest(tmp_path, value, hint):
    (problem,) = problems_of(tmp_path, f'[run]\nprecision = {value}\n[model]\nuse = "stagewise.transformer"\n'
                                       f'[[stages]]\nname = "a"\n')
    assert problem.endswith(f"is not one of the valid choices: 'fp32', 'bf16'{hint}")


def test_missing_tables_and_duplicate_stage_names(tmp_path):
    problems = problems_of(tmp_path, '[[stages]]\nname = "a"\n[[stages]]\nname = "a"\n')
    assert any(p.startswith("model: required table is missing") for p in problems)
    assert any("the name 'a' is used by more than one stage" in p for p in problems)
    assert not any("checkpoint" in p for p in problems)  # the checkpoint defaults to the name: one mistake


def test_checkpoint_names_differing_only_in_case_are_refused(tmp_path):
    # was accepted: on macOS and Windows Train.pt and train.pt, LAST.pt and last.pt, are one file
    stages = "".join(f'[[stages]]\nname = "{name}"\n' for name in ("Train", "train", "LAST", "tune"))
    problems = problems_of(tmp_path, f'[model]\nuse = "stagewise.transformer"\n{stages}')
    assert problems == [
        "stages.LAST.name: checkpoint name 'LAST': 'last' is reserved for the resume checkpoint; choose another",
        "stages: the checkpoint names 'Train' and 'train' differ only in case, so they are one file where case is "
        "ignored (macOS, Windows); rename one"]


def test_checkpoint_names_one_file_on_macos_or_windows_are_refused(tmp_path):
    # were accepted: macOS ignores Unicode normalisation (NFC "한" and its NFD jamo are one file, as are the
    # angstrom sign and "Å", letters both), Windows has no file named nul.pt, with any extension, in any case
    names = ("\ud55c", "\u1112\u1161\u11ab", "\u212b", "\u00c5", "Nul", "COM\u00b9", "console")
    stages = "".join(f'[[stages]]\nname = "{name}"\n' for name in names)
    problems = problems_of(tmp_path, f'[model]\nuse = "stagewise.transformer"\n{stages}')
    assert problems == [
        "stages.Nul.name: checkpoint name 'Nul' (checkpoints/Nul.pt): 'Nul' is a device name on Windows (CON, PRN, "
        "AUX, NUL, COM0-9, LPT0-9), with any extension and in any case; write e.g. 'Nul_'",
        "stages.COM\u00b9.name: checkpoint name 'COM\u00b9' (checkpoints/COM\u00b9.pt): 'COM\u00b9' is a device "
        "name on Windows (CON, PRN, AUX, NUL, COM0-9, LPT0-9), with any extension and in any case; write e.g. "
        "'COM\u00b9_'",
        "stages: the checkpoint names '\ud55c' and '\u1112\u1161\u11ab' are one name in two Unicode normalisations "
        "(NFC and NFD), so they are one file on macOS; rename one",
        "stages: the checkpoint names '\u212b' and '\u00c5' are one name in two Unicode normalisations (NFC and NFD), "
        "so they are one file on macOS; rename one"]


def test_nested_loss_terms_are_validated(tmp_path):
    problems = problems_of(tmp_path, """
[model]
use = "stagewise.transformer"
[[stages]]
name = "a"
losses = [{ use = "stagewise.cross_entropy", at_layr = 1, weight = "x" }]
""")
    unknown = next(p for p in problems if p.startswith("stages.a.losses.cross_entropy.at_layr: unknown key"))
    assert "did you mean 'at_layer'?" in unknown
    assert "fallback_threshold" in unknown and "ignore_index" in unknown  # engine and loss keys
    assert any(p.startswith("stages.a.losses.cross_entropy.weight: expected float, got str 'x'") for p in problems)


def test_post_init_checks_are_reported(tmp_path):
    (problem,) = problems_of(tmp_path, """
[model]
use = "stagewise.transformer"
[[stages]]
name = "a"
max_epochs = 0
""")
    assert problem == "stages.a.max_epochs: must be >= 1, got 0"


def test_grow_is_checked_against_the_model_options(tmp_path):
    (problem,) = problems_of(tmp_path, """
[model]
use = "stagewise.transformer"
[[stages]]
name = "a"
grow = { n_layers = 4 }
""")
    assert problem.startswith("stages.a.grow.n_layers: unknown key; did you mean 'n_layer'?")


def test_an_unknown_key_with_no_close_match_still_lists_the_valid_keys(tiny):
    with pytest.raises(ConfigError) as info:
        tiny("model.zzz=1")
    assert info.value.problems[0].startswith("model.zzz: unknown key. Valid keys: dropout, ffn_hidden, ")


def test_overrides_are_typed_and_address_stages_by_name(tiny):
    recipe = tiny("stages.phase2.max_epochs=5", "run.seed=3", "data.path=/tmp/x", "stages.phase1.lr=1e-4")
    assert recipe.stages[1].options.max_epochs == 5 and recipe.run.seed == 3
    assert recipe.data.options.path == "/tmp/x" and recipe.stages[0].options.lr == 1e-4


def test_bad_overrides(tiny):
    with pytest.raises(ConfigError) as info:
        tiny("stages.nope.lr=1", "no_equals_sign", "run.seed=abc")
    problems = info.value.problems
    assert "no stage named 'nope'; stages: phase1, phase2, test" in problems[0]
    assert "expected KEY.PATH=VALUE" in problems[1]
    assert problems[2] == "run.seed: expected int, got str 'abc'"


def test_a_set_of_a_whole_stage_or_term_says_to_set_its_keys(tiny):
    with pytest.raises(ConfigError) as info:
        tiny("stages.phase1=3", "stages.phase1.losses.cross_entropy=1")
    assert info.value.problems == [
        "--set 'stages.phase1=3': stages.phase1 names a stage, not a key; set its keys as stages.NAME.KEY=VALUE, "
        "or remove it with ~stages.phase1",
        "--set 'stages.phase1.losses.cross_entropy=1': stages.phase1.losses.cross_entropy names a loss term, not a "
        "key; set its keys as stages.NAME.losses.TERM.KEY=VALUE, or remove it with ~stages.phase1.losses.cross_entropy"]


def test_overrides_address_loss_terms_by_name(tiny):
    terms = '[{use="stagewise.cross_entropy"}, {use="stagewise.cross_entropy", name="exit1", at_layer=1}]'
    recipe = tiny(f"stages.phase1.losses={terms}", "stages.phase1.losses.exit1.weight=0.3",
                  "stages.phase1.losses.cross_entropy.label_smoothing=0.1")  # unnamed: the part of use after the dot
    main, exit1 = recipe.stages[0].options.losses
    assert (exit1.name, exit1.weight, exit1.options.at_layer) == ("exit1", 0.3, 1)
    assert (main.weight, main.options.label_smoothing) == (1.0, 0.1)


def test_a_tilde_override_removes_a_key_a_stage_or_a_loss_term(tiny):
    # was: no way to drop what a named recipe holds (e.g. koopman.hybrid's forward stage, which refuses a time term)
    assert (tiny().stages[0].options.grad_clip, tiny().run.log_every_n_steps) == (1.0, 1)  # as the file says
    recipe = tiny("~stages.phase1.grad_clip", "~stages.test", "~run.log_every_n_steps")
    assert [s.name for s in recipe.stages] == ["phase1", "phase2"]
    assert (recipe.stages[0].options.grad_clip, recipe.run.log_every_n_steps) == (None, 10)  # the defaults
    terms = '[{use="stagewise.cross_entropy"}, {use="stagewise.cross_entropy", name="exit1", at_layer=1}]'
    recipe = tiny(f"stages.phase1.losses={terms}", "~stages.phase1.losses.exit1")
    assert [t.name for t in recipe.stages[0].options.losses] == ["cross_entropy"]
    assert tiny("~stages.phase2.grow.n_layer").stages[1].grow == {}


def test_a_tilde_override_that_finds_nothing_to_remove_says_what_is_there(tiny):
    with pytest.raises(ConfigError) as info:
        tiny("~stages.phase9", "~run.nokey", "~nosuch.key", "~stages.phase1.losses.exit1", "~run.seed=3", "~model")
    assert str(info.value).splitlines()[1:] == [
        "  - --set '~stages.phase9': no stage named 'phase9'; stages: phase1, phase2, test (address a stage's key "
        "as stages.NAME.KEY=VALUE)",
        "  - --set '~run.nokey': nothing to remove: the recipe has no run.nokey",
        "  - --set '~nosuch.key': nothing to remove: the recipe has no nosuch",
        "  - --set '~stages.phase1.losses.exit1': nothing to remove: the recipe has no stages.phase1.losses",
        "  - --set '~run.seed=3': expected ~KEY.PATH, which removes that key, e.g. ~stages.forward",
        "  - model (from --set ~model): required table is missing (e.g. [model] use = \"stagewise.transformer\")"]


def test_an_unknown_loss_term_lists_the_stage_s_terms(tiny):
    terms = '[{use="stagewise.cross_entropy"}, {use="stagewise.cross_entropy", name="exit1", at_layer=1}]'
    with pytest.raises(ConfigError) as info:
        tiny(f"stages.phase1.losses={terms}", "stages.phase1.losses.exit2.weight=0.3",
             "stages.phase2.losses.cross_entropy.weight=2")  # phase2 leaves losses at the default
    assert info.value.problems == [
        "--set 'stages.phase1.losses.exit2.weight=0.3': no loss term named 'exit2'; losses: cross_entropy, exit1 "
        "(address a loss term's key as stages.NAME.losses.TERM.KEY=VALUE)",
        "--set 'stages.phase2.losses.cross_entropy.weight=2': no loss term named 'cross_entropy'; the recipe "
        "lists no losses there (the stage's default applies: set the whole list)"]


def test_unknown_recipe_name_lists_the_installed_ones():
    with pytest.raises(ConfigError, match="Installed recipes: stagewise.demo"):
        load_recipe("no-such-recipe")


def test_resolved_recipe_round_trips(tiny, tmp_path):
    recipe = tiny()
    text = recipe.to_toml()
    again = recipe_from_table(__import__("tomllib").loads(text), "again", [])
    assert again.table == recipe.table
    assert "max_steps_per_epoch = 5" in text and "[[stages]]" in text


def test_every_shipped_recipe_validates():
    from stagewise import get_recipes

    for name in get_recipes():
        assert load_recipe(name).stages


def test_toml_writer_escapes():
    assert dumps({"a": {"s": 'q"uote', "f": 1e-05, "l": [1, 2], "t": {"x": True}}}) == \
        '[a]\ns = "q\\"uote"\nf = 1e-05\nl = [1, 2]\nt = { x = true }\n'


def test_toml_writer_keeps_the_sign_of_infinity():
    import tomllib

    table = {"a": {"lo": -math.inf, "hi": math.inf}}
    assert tomllib.loads(dumps(table)) == table


def test_toml_writer_quotes_keys_toml_does_not_allow_bare():
    import tomllib

    table = {"data": {"splits": {"tést": 0.1, "a b": 0.2, "ok_key-1": 0.3}}}
    assert tomllib.loads(dumps(table)) == table


def test_a_folder_named_like_a_recipe_is_not_the_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()
    assert load_recipe("demo").source.endswith("demo.toml")


def test_lbfgs_refuses_grad_clip(tiny):
    from stagewise.errors import ConfigError

    with pytest.raises(ConfigError, match="stages.phase1.grad_clip: cannot be used with optimizer 'lbfgs'"):
        tiny('stages.phase1.optimizer="lbfgs"')


def test_unknown_split_is_reported_before_anything_runs(tiny, tmp_path):
    from stagewise.engine.runner import run_recipe

    recipe = tiny('stages.test.split="tst"', 'stages.phase1.eval_split="vaild"')
    with pytest.raises(ConfigError) as info:
        run_recipe(recipe, out=tmp_path / "run", quiet=True)
    assert info.value.problems == [
        "stages.phase1.eval_split: no split named 'vaild'; the data has: train, valid, test",
        "stages.test.split: no split named 'tst'; the data has: train, valid, test"]
    assert not (tmp_path / "run").exists()



def test_a_split_the_data_lacks_says_how_to_give_it(tiny, tmp_path):
    # was: only "no split named 'valid'; the data has: train", for a folder holding train.txt alone
    from stagewise.engine.runner import run_recipe

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.txt").write_text("the old man and the sea\n" * 200)
    with pytest.raises(ConfigError) as info:
        run_recipe(tiny(f"data.path={str(tmp_path / 'data')!r}"), out=tmp_path / "run", quiet=True)
    assert info.value.problems[0] == (
        "stages.phase1.eval_split: no split named 'valid'; the data has: train; give the data a 'valid' split "
        "(a folder of split files: add valid.txt beside train.txt) or set eval_split to a split it has")
    assert not (tmp_path / "run").exists()

def test_bad_model_option_value_is_a_recipe_error(tiny, tmp_path):
    from stagewise.engine.runner import run_recipe

    with pytest.raises(ConfigError, match=r"model \(stagewise.transformer\): .*max_seq_len"):
        run_recipe(tiny("model.max_seq_len=4"), out=tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()


def test_exit_layer_outside_the_model_is_reported_before_anything_runs(tiny, tmp_path):
    from stagewise.engine.runner import run_recipe

    recipe = tiny('stages.phase1.losses=[{use="stagewise.cross_entropy", at_layer=3}]',
                  'stages.phase2.losses=[{use="stagewise.cross_entropy", at_layer=3}]')
    with pytest.raises(ConfigError) as info:  # phase2 grows the model to 3 layers: fine there
        run_recipe(recipe, out=tmp_path / "run", quiet=True)
    assert info.value.problems == ["stages.phase1.losses.cross_entropy: at_layer 3 is outside the model's layers 1..2"]
    assert not (tmp_path / "run").exists()


def test_exit_layer_zero_the_embedding_is_reported_before_anything_runs(tiny, tmp_path):
    from stagewise.engine.runner import run_recipe

    recipe = tiny('stages.phase1.losses=[{use="stagewise.cross_entropy", at_layer=0}]')
    with pytest.raises(ConfigError) as info:
        run_recipe(recipe, out=tmp_path / "run", quiet=True)
    assert info.value.problems == ["stages.phase1.losses.cross_entropy: at_layer 0 is outside the model's layers 1..2"]
    assert not (tmp_path / "run").exists()


def test_a_relative_data_path_in_a_recipe_file_is_relative_to_that_file(tmp_path, monkeypatch):
    from conftest import TINY

    folder = tmp_path / "project" / "recipes"
    folder.mkdir(parents=True)
    (folder / "r.toml").write_text(TINY.replace('use = "stagewise.text"', 'use = "stagewise.text"\npath = "../corpus"'))
    monkeypatch.chdir(tmp_path)  # run from elsewhere: the path still means project/corpus
    recipe = load_recipe("project/recipes/r.toml")
    assert recipe.table["data"]["path"] == str((tmp_path / "project" / "corpus").resolve())
    assert recipe.data.options.path == recipe.table["data"]["path"]


def test_a_data_path_given_by_set_is_stored_absolute_from_the_working_directory(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # so RUN_DIR/recipe.toml runs again from anywhere
    assert tiny("data.path=corpus").table["data"]["path"] == str(tmp_path / "corpus")
    assert tiny("data={path='corpus'}").table["data"]["path"] == str(tmp_path / "corpus")


def test_an_absolute_or_home_data_path_is_kept(tmp_path, monkeypatch):
    from conftest import TINY

    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # where ~ points
    home = tmp_path / "home"
    for given, expected in ((str(tmp_path / "abs"), str(tmp_path / "abs")), ("~/texts", str(home / "texts"))):
        path = tmp_path / "r.toml"
        path.write_text(TINY.replace('use = "stagewise.text"', f'use = "stagewise.text"\npath = "{given}"'))
        assert load_recipe(path).table["data"]["path"] == expected


def test_idx_files_in_a_recipe_file_are_relative_to_that_file(tmp_path, monkeypatch):
    (tmp_path / "r.toml").write_text('[data]\nuse = "stagewise.idx"\nimages = "img.idx"\nlabels = "~/lab.idx"\n'
                                     '[model]\nuse = "stagewise.mlp"\n[[stages]]\nname = "s"\n')
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir("/")
    data = load_recipe(tmp_path / "r.toml", ["data.scale=1.0"]).table["data"]
    assert (data["images"], data["labels"]) == (str(tmp_path / "img.idx"), str(tmp_path / "home" / "lab.idx"))
    assert load_recipe(tmp_path / "r.toml", ["data.images=x.idx"]).table["data"]["images"] == "/x.idx"


def test_run_out_expands_the_home_folder(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert tiny("run.out='~/runs'").run.out == str(tmp_path / "runs")


def test_a_number_for_a_string_key_says_to_quote_it(tiny):
    with pytest.raises(ConfigError) as info:
        tiny("run.name=2024")
    assert info.value.problems == ["run.name: expected str, got int 2024; quote it: \"2024\" "
                                   "(with --set: --set 'run.name=\"2024\"')"]
    assert tiny('run.name="2024"').run.name == "2024"


def test_model_n_outputs_below_the_labels_is_a_model_error(tmp_path):
    from stagewise.engine.runner import run_recipe

    (tmp_path / "c.csv").write_text("x,y\n" + "".join(f"{i},{i % 3}\n" for i in range(6)))
    (tmp_path / "r.toml").write_text(CLASSES)
    recipe = load_recipe(tmp_path / "r.toml", ['data.target_dtype="long"', "model.n_outputs=2"])
    with pytest.raises(ConfigError, match=r"model \(stagewise.mlp\): n_outputs = 2 is less than the data's "
                                          r"n_outputs = 3"):
        run_recipe(recipe, out=tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()


def test_data_longer_than_max_seq_len_names_both_keys(tiny, tmp_path):
    from stagewise.engine.runner import run_recipe

    with pytest.raises(ConfigError) as info:
        run_recipe(tiny("model.max_seq_len=4"), out=tmp_path / "run", quiet=True)
    assert "data.seq_len = 8 exceeds model.max_seq_len = 4; raise model.max_seq_len" in str(info.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_negative_labels_train_as_ignore_index_and_others_are_a_clear_error(tmp_path, device):
    # on CUDA torch's bound check is a device-side assert that poisons the process: checked before it
    from stagewise.data.splits import DataError
    from stagewise.engine.runner import run_recipe

    (tmp_path / "c.csv").write_text("x,y\n" + "".join(f"{i},{i % 3 - 1}\n" for i in range(6)))  # -1, 0, 1
    (tmp_path / "r.toml").write_text(CLASSES)
    skip = [f"run.device={device}", 'data.target_dtype="long"', "model.n_outputs=2",
            'stages.s.losses=[{ use = "stagewise.cross_entropy", ignore_index = -1 }]']
    metrics = json.loads((run_recipe(load_recipe(tmp_path / "r.toml", skip), out=tmp_path / "ok", quiet=True)
                          / "summary.json").read_text())["metrics"]
    assert math.isfinite(metrics["val/loss"])  # the -1 labels were skipped, as the term says
    with pytest.raises(DataError, match=r"stagewise.cross_entropy: Target -1 is out of bounds. The batch's "
                                        r"'target' must hold class labels 0..1, or ignore_index = -100"):
        run_recipe(load_recipe(tmp_path / "r.toml", skip[:3]), out=tmp_path / "bad", quiet=True)


def test_cross_entropy_refuses_float_targets_before_the_run(tmp_path):
    import torch

    from stagewise.builtins.losses import CrossEntropy
    from stagewise.data.splits import DataError
    from stagewise.engine.runner import run_recipe

    (tmp_path / "c.csv").write_text("x,y\n" + "".join(f"{i},{i / 4}\n" for i in range(6)))
    (tmp_path / "r.toml").write_text(CLASSES)
    with pytest.raises(ConfigError) as info:
        run_recipe(load_recipe(tmp_path / "r.toml"), out=tmp_path / "run", quiet=True)
    (problem,) = info.value.problems
    assert problem.startswith("stages.s.losses.cross_entropy: stagewise.cross_entropy needs class labels, but the "
                              "data's 'target' holds torch.float32 values; for class labels set data.target_dtype")
    assert not (tmp_path / "run").exists()
    # batches a stage draws from elsewhere (a cache) meet the same refusal at the first batch
    with pytest.raises(DataError, match=r"needs class labels, but the data's 'target' holds torch.float64"):
        CrossEntropy()({"logits": torch.zeros(2, 3)}, {"target": torch.zeros(2, dtype=torch.float64)}, None)


def test_an_integer_is_a_float_but_a_boolean_is_no_number(tiny):
    recipe = tiny("stages.phase1.lr=1", "stages.phase1.grad_clip=2")
    lr, clip = recipe.stages[0].options.lr, recipe.stages[0].options.grad_clip
    assert (lr, clip) == (1.0, 2.0) and type(lr) is float and type(clip) is float
    assert recipe.table["stages"][0]["lr"] == 1.0 and type(recipe.table["stages"][0]["lr"]) is float
    with pytest.raises(ConfigError) as info:
        tiny("stages.phase1.max_epochs=true", "stages.phase1.lr=false")
    assert sorted(info.value.problems) == ["stages.phase1.lr: expected float, got bool False",
                                           "stages.phase1.max_epochs: expected int, got bool True"]


def test_grow_is_checked_against_the_model_as_grown_by_the_stages_before(tiny):
    # n_head 3 divides n_embd 24 (phase1's growth), not the recipe's n_embd 16
    recipe = tiny("stages.phase1.grow={n_embd = 24}", "stages.phase2.grow={n_layer = 3, n_head = 3}")
    options = recipe.model_options_at(1)
    assert (options.n_embd, options.n_head, options.n_layer) == (24, 3, 3)
    with pytest.raises(ConfigError) as info:
        tiny("stages.phase2.grow={n_head = 3}")
    (problem,) = info.value.problems
    assert problem.startswith("stages.phase2.grow.n_head: n_embd (16) must be divisible by n_head (3)")


@pytest.mark.parametrize(("grow", "named"), [("{n_head = 3}", "n_head"), ("{n_embd = 17}", "n_embd"),
                                             ("{n_embd = 17, n_head = 4}", "n_embd")])
def test_a_grow_problem_names_a_key_the_grow_table_sets(tiny, grow, named):
    # was: stages.phase2.grow.n_embd for grow = {n_head = 3}, a key that grow table does not have
    with pytest.raises(ConfigError) as info:
        tiny(f"stages.phase2.grow={grow}")
    (problem,) = info.value.problems
    assert problem.startswith(f"stages.phase2.grow.{named}: n_embd (")


def test_a_bad_grow_is_reported_once_not_again_by_each_later_grow(tiny):
    # was: stages.phase2.grow.n_layerz reported too, since phase2's check saw phase1's growth
    with pytest.raises(ConfigError) as info:
        tiny("stages.phase1.grow={n_layerz = 3}", "stages.phase2.grow={n_layer = 3}")
    (problem,) = info.value.problems
    assert problem.startswith("stages.phase1.grow.n_layerz: unknown key; did you mean 'n_layer'?")


@pytest.mark.parametrize("name", ['""', '"../x"', '"/tmp/elsewhere"'])
def test_the_run_name_is_one_folder_name(tiny, name):
    # fuzzing: run.name = "" made the run directory run.out itself; "../x" and an absolute path
    # put it outside run.out
    with pytest.raises(ConfigError, match="run.name"):
        tiny(f"run.name={name}")


def test_a_set_value_nested_too_deep_for_toml_is_a_string_the_schema_refuses(tiny):
    # was: RecursionError traceback from tomllib
    deep = "[" * 3000 + "]" * 3000
    with pytest.raises(ConfigError) as info:
        tiny(f"run.seed={deep}")
    (problem,) = info.value.problems
    assert problem.startswith("run.seed: expected int, got str '[[[")


def test_problems_name_a_stage_as_set_addresses_it(tmp_path):
    # was: stages[1].grow..., stages[5].eval_split: the user counted [[stages]] tables to find the one meant
    # (and a grow after an invalid stage was named by the wrong index); only an unusable name falls back to it
    problems = problems_of(tmp_path, """
[model]
use = "stagewise.transformer"
[[stages]]
lr = "slow"
[[stages]]
name = "main"
grow = { n_layers = 4 }
[[stages]]
name = "twice"
lr = "x"
[[stages]]
name = "twice"
[[stages]]
name = "a.b"
checkpoint = "ab"
lr = "y"
[[stages]]
name = "last"
eval_split = 2024
""")
    assert [p.split(":")[0] for p in problems] == [
        "stages[0].lr", "stages[0].name", "stages[2].lr", "stages[4].lr", "stages.last.eval_split",
        "stages.last.name", "stages.main.grow.n_layers"]  # the reserved checkpoint name, with the type problem
    assert problems[4].endswith("""(with --set: --set 'stages.last.eval_split="2024"')""")


def test_a_stage_check_names_the_stage_as_set_addresses_it(tiny):
    recipe = tiny()
    assert [recipe.stage_path(i) for i in range(3)] == ["stages.phase1", "stages.phase2", "stages.test"]


@dataclasses.dataclass
class _Inner:
    hard_ratio: float = 0.5


@dataclasses.dataclass
class _Outer:
    inner: _Inner = dataclasses.field(default_factory=_Inner)
    split: str = "train"


def test_an_unknown_key_of_a_nested_table_says_where_it_belongs():
    # as `--set stages.mine.hard_ratio=2` on lego_ashem.ashem, whose hard_ratio is in the stage's router table
    from stagewise.schema import build_dataclass

    problems: list[str] = []
    build_dataclass(_Outer, {"hard_ratio": 0.2, "splt": "x"}, "stages.mine", problems)
    assert problems == [
        "stages.mine.hard_ratio: unknown key; did you mean stages.mine.inner.hard_ratio (a key of the inner "
        "table)? Valid keys: inner, split",
        "stages.mine.splt: unknown key; did you mean 'split'? Valid keys: inner, split"]


# was: stages.phase1.losses[1].weight, stages.phase1.losses[0]: ...: the user counted the stage's loss tables,
# then had to write --set stages.phase1.losses.exit1.weight=... anyway
def test_problems_name_a_loss_term_as_set_addresses_it(tiny, tmp_path):
    from stagewise.engine.runner import run_recipe

    terms = '[{use="stagewise.cross_entropy", target=5}, {use="stagewise.cross_entropy", name="exit1", weight="x"}]'
    with pytest.raises(ConfigError) as info:
        tiny(f"stages.phase1.losses={terms}")
    assert info.value.problems == [
        "stages.phase1.losses.cross_entropy.target: expected str, got int 5; quote it: \"5\" "
        "(with --set: --set 'stages.phase1.losses.cross_entropy.target=\"5\"')",
        "stages.phase1.losses.exit1.weight: expected float, got str 'x'"]
    recipe = tiny('stages.phase1.losses=[{use="stagewise.cross_entropy", name="exit3", at_layer=3}]')
    with pytest.raises(ConfigError) as info:
        run_recipe(recipe, out=tmp_path / "run", quiet=True)
    assert info.value.problems == ["stages.phase1.losses.exit3: at_layer 3 is outside the model's layers 1..2"]


def test_loss_terms_sharing_a_name_are_named_by_position(tiny, tmp_path):
    from stagewise.engine.runner import run_recipe

    ce = '{use="stagewise.cross_entropy"}'
    with pytest.raises(ConfigError) as info:
        tiny(f'stages.phase1.losses=[{ce}, {{use="stagewise.cross_entropy", weight="x"}}]')
    assert info.value.problems == ["stages.phase1.losses[1].weight: expected float, got str 'x'"]
    recipe = tiny(f'stages.phase1.losses=[{ce}, {{use="stagewise.cross_entropy", at_layer=3}}]')
    with pytest.raises(ConfigError) as info:
        run_recipe(recipe, out=tmp_path / "run", quiet=True)
    assert info.value.problems == [
        "stages.phase1.losses: two terms are named 'cross_entropy'; set a distinct 'name'",
        "stages.phase1.losses[1]: at_layer 3 is outside the model's layers 1..2"]


@pytest.mark.parametrize("name", ["a=b", " padded", "a.b", 7])
def test_a_loss_term_set_cannot_address_is_named_by_position(tiny, name):
    term = f'{{use="stagewise.cross_entropy", name={json.dumps(name)}, target=5}}'
    with pytest.raises(ConfigError) as info:
        tiny(f"stages.phase1.losses=[{term}]")
    problems = info.value.problems
    assert all(p.startswith("stages.phase1.losses[0].") for p in problems)
    assert ('stages.phase1.losses[0].target: expected str, got int 5; quote it: "5" '
            "(with --set: --set 'KEY=\"5\"')") in problems  # no path --set takes: the hint says KEY


@pytest.mark.parametrize("name", ["a=b", " padded"])
def test_a_valid_term_name_set_cannot_address_is_named_by_position_in_stage_checks(tiny, tmp_path, name):
    from stagewise.engine.runner import run_recipe

    recipe = tiny(f'stages.phase1.losses=[{{use="stagewise.cross_entropy", name={json.dumps(name)}, at_layer=3}}]')
    with pytest.raises(ConfigError) as info:
        run_recipe(recipe, out=tmp_path / "run", quiet=True)
    assert info.value.problems == ["stages.phase1.losses[0]: at_layer 3 is outside the model's layers 1..2"]


def test_a_term_name_with_a_dot_is_refused_at_its_position(tiny):
    with pytest.raises(ConfigError) as info:
        tiny('stages.phase1.losses=[{use="stagewise.cross_entropy", name="a.b"}]')
    assert info.value.problems == ["stages.phase1.losses[0].name: term name 'a.b': use a non-empty name without '.'"]


@dataclasses.dataclass
class _Named:
    name: str
    size: int = 1

    @classmethod
    def item_name(cls, value) -> str | None:
        return value.get("name") if isinstance(value, dict) else None


def test_a_list_s_item_type_names_its_items_through_item_name():
    from stagewise.schema import coerce

    problems: list[str] = []
    coerce([{"name": "a", "size": "x"}, {"name": "b", "size": "y"}, {"name": "b", "size": "z"}, 3],
           list[_Named], "parts", problems)
    assert [p.split(":")[0] for p in problems] == ["parts.a.size", "parts[1].size", "parts[2].size", "parts[3]"]
    problems = []
    coerce([{"size": "x"}], list[_Outer], "plain", problems)  # no item_name: by position
    assert [p.split(":")[0] for p in problems] == ["plain[0].size"]


def test_coerce_keys_without_an_unknown_message_names_the_valid_keys():
    # was a TypeError ('NoneType' object is not callable) for a key the types lack
    from stagewise.schema import coerce_keys

    problems: list[str] = []
    values, bad = coerce_keys({"size": 2, "szie": 3}, {"size": int, "depth": int}, "model", problems)
    assert (values, bad) == ({"size": 2}, set())
    assert problems == ["model.szie: unknown key; did you mean 'size'? Valid keys: depth, size"]


def test_a_value_no_member_of_a_union_takes_names_every_member():
    from stagewise.schema import coerce

    problems: list[str] = []  # a plugin's option typed `int | str`: not just the first member's complaint
    assert coerce(1.5, int | str, "size", problems) == 1.5
    assert problems == ["size: expected int or str, got float 1.5"]


@pytest.mark.parametrize("sets, key, problem", [
    ([], "data.path", "CSV file {dir}/c.csv does not exist; check the path"),
    (['data={use="stagewise.text", path="no_corpus"}'], "data.path",
     "text data path {dir}/no_corpus does not exist; set path to"),
    (['data={use="stagewise.idx", images="i.idx", labels="l.idx"}'], "data.images",
     "IDX file {dir}/i.idx does not exist; check the path")], ids=["csv", "text", "idx"])
def test_a_data_file_problem_names_the_recipe_file_and_its_key(tmp_path, monkeypatch, sets, key, problem):
    from stagewise.engine.runner import run_recipe

    (tmp_path / "r.toml").write_text(CLASSES)  # c.csv is not there
    monkeypatch.chdir(tmp_path)  # --set paths start from here
    with pytest.raises(ConfigError) as info:  # was a DataError naming the file alone
        run_recipe(load_recipe(tmp_path / "r.toml", sets), out=tmp_path / "run", quiet=True)
    assert info.value.source == str(tmp_path / "r.toml")
    assert info.value.problems[0].startswith(f"{key}: {problem.format(dir=tmp_path)}")
    assert not (tmp_path / "run").exists()


def test_a_problem_with_a_value_set_says_it_came_from_set(tiny, tiny_recipe_path):
    # was: "tiny.toml: ... - data.seq_len: ...", as if the file held the value the command line gave
    with pytest.raises(ConfigError) as info:
        tiny("data={use=\"stagewise.text\", batch_size=0}", "data.seq_len=true", "stages.phase1.lr=-1")
    assert info.value.problems == ["data.seq_len: expected int, got bool True",  # as the key path addresses it
                                   "data.batch_size: must be >= 1, got 0", "stages.phase1.lr: must be a finite number "
                                   ">= 0, got -1.0"]
    assert str(info.value).splitlines()[1:] == [
        "  - data.seq_len (from --set data.seq_len=true): expected int, got bool True",  # the longest key set
        "  - data.batch_size (from --set data={use=\"stagewise.text\", batch_size=0}): must be >= 1, got 0",
        "  - stages.phase1.lr (from --set stages.phase1.lr=-1): must be a finite number >= 0, got -1.0"]
    tiny_recipe_path.write_text(tiny_recipe_path.read_text().replace("batch_size = 4", "batch_size = 0"))
    with pytest.raises(ConfigError) as info:
        tiny("data.seq_len=2")  # the file's value: named as before
    assert str(info.value).endswith("\n  - data.batch_size: must be >= 1, got 0")


def test_a_table_only_set_made_is_marked_as_set(tiny):
    # was: "- stages.phase2.rooter: unknown key. ..." with no mark, though the file has no rooter
    with pytest.raises(ConfigError) as info:
        tiny("stages.phase2.rooter.k=1", "stages.phase2.rooter.use=\"x\"", "stages.phase1.grad_clip=-1")
    first, made = str(info.value).splitlines()[1:]
    assert first == "  - stages.phase1.grad_clip (from --set stages.phase1.grad_clip=-1): must be > 0, got -1.0"
    assert made.startswith("  - stages.phase2.rooter (from --set stages.phase2.rooter.k=1): unknown key. Valid keys:")
    with pytest.raises(ConfigError) as info:  # a table the file holds is not marked for a key --set adds to it
        tiny("stages.phase1.grow.n_lyer=3")
    assert "  - stages.phase1.grow.n_lyer (from --set stages.phase1.grow.n_lyer=3): unknown key" in str(info.value)


def test_a_data_file_problem_says_when_set_gave_the_path(tmp_path, monkeypatch):
    # was: "r.toml: 1 problem: - data.path: ...", though the path came from the command line
    from stagewise.engine.runner import run_recipe

    (tmp_path / "r.toml").write_text(CLASSES)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        run_recipe(load_recipe(tmp_path / "r.toml", ["data.path=empty.csv"]), out=tmp_path / "run", quiet=True)
    assert str(info.value).startswith(f"{tmp_path / 'r.toml'}: 1 problem:\n  - data.path (from --set "
                                      f"data.path=empty.csv): CSV file {tmp_path / 'empty.csv'} does not exist")


def test_a_value_problem_is_reported_with_a_type_problem_of_another_key(tiny):
    # was: only the type problem; the value problem came the next round, named by its table
    # ("stages.phase1: lr must be a finite number >= 0, got -1.0")
    with pytest.raises(ConfigError) as info:
        tiny("stages.phase1.max_epochs=2.5", "stages.phase1.lr=-1", "data.seq_len=true", "data.batch_size=0")
    assert info.value.problems == [
        "data.seq_len: expected int, got bool True",
        "data.batch_size: must be >= 1, got 0",  # the engine's key, checked although the options failed
        "stages.phase1.max_epochs: expected int, got float 2.5",
        "stages.phase1.lr: must be a finite number >= 0, got -1.0"]


def test_a_value_check_that_read_a_key_with_a_type_problem_is_not_reported(tiny):
    # min_lr is checked against lr: with lr at its default the check would be wrong
    with pytest.raises(ConfigError) as info:
        tiny('stages.phase1.lr="fast"', "stages.phase1.min_lr=0.5", "stages.phase1.patience=0")
    assert info.value.problems == ["stages.phase1.lr: expected float, got str 'fast'",
                                   "stages.phase1.patience: must be >= 1, got 0"]


@dataclasses.dataclass
class _PlainOptions:
    """A third-party Options whose __post_init__ raises a plain ValueError, as plugins did before OptionError."""

    size: int = 1
    rate: float = 0.5

    def __post_init__(self):
        if self.rate > 1:
            raise ValueError(f"rate must be <= 1, got {self.rate}")


@dataclasses.dataclass
class _KeyedOptions:
    size: int = 1
    low: float = 0.0
    high: float = 1.0

    def __post_init__(self):
        from stagewise import check_options

        check_options([(self.size >= 1, "size", f"must be >= 1, got {self.size}"),
                       (self.low <= self.high, ("low", "high"), f"must be <= high = {self.high}, got {self.low}"),
                       (self.low >= 0, "low", f"must be >= 0, got {self.low}")])


def test_a_plain_value_error_is_reported_against_its_table():
    from stagewise.schema import build_dataclass

    problems = []
    assert build_dataclass(_PlainOptions, {"rate": 2.0}, "stages.s.router", problems) is None
    assert problems == ["stages.s.router: rate must be <= 1, got 2.0"]
    problems = []  # it names no key: with a type problem in the table it may be about a default, so it waits
    assert build_dataclass(_PlainOptions, {"rate": 2.0, "size": "big"}, "stages.s.router", problems) is None
    assert problems == ["stages.s.router.size: expected int, got str 'big'"]


def test_keyed_value_problems_name_their_keys():
    from stagewise import OptionError
    from stagewise.schema import build_dataclass

    problems = []
    assert build_dataclass(_KeyedOptions, {"size": 0, "low": -2.0, "high": -3.0}, "model", problems) is None
    assert problems == ["model.size: must be >= 1, got 0", "model.low: must be <= high = -3.0, got -2.0",
                        "model.low: must be >= 0, got -2.0"]
    problems = []  # low's first check read high, which has a type problem; its second did not
    assert build_dataclass(_KeyedOptions, {"low": -2.0, "high": "x", "typo": 1}, "model", problems) is None
    assert problems == ["model.high: expected float, got str 'x'",
                        "model.typo: unknown key. Valid keys: high, low, size", "model.low: must be >= 0, got -2.0"]
    with pytest.raises(OptionError, match=r"^low: must be <= high = -3\.0, got -1\.0; low: must be >= 0, got -1\.0$"):
        _KeyedOptions(low=-1.0, high=-3.0)


def test_checks_of_one_key_are_joined():
    from stagewise import OptionError, TrainStage

    with pytest.raises(OptionError, match=r"^betas: must be in \[0, 1\), got \[2\.0\]; must be two numbers, "
                                          r"got \[2\.0\]$"):
        TrainStage.Options(betas=[2.0])


def test_an_lr_that_overflows_the_optimizer_is_refused_before_anything_runs(tiny, tmp_path):
    # was: a RuntimeError from AdamW ("value cannot be converted to type float without overflow") at the first step
    from stagewise.engine.runner import run_recipe

    with pytest.raises(ConfigError) as info:
        run_recipe(tiny("stages.phase1.lr=1e38"), out=tmp_path / "run", quiet=True)
    assert info.value.problems == ["stages.phase1.lr: must be <= 1e+30 (torch's optimizers overflow float32 above "
                                   "it), got 1e+38"]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("override", "problem"), [
    ("stages=[]", "stages: at least one [[stages]] table is required"),
    ("run.name.x=1", "--set 'run.name.x=1': 'name' is not a table"),
    ("stages.phase1.train=5", "stages.phase1.train: expected a list, got int 5"),
    ("stages.phase1.grow=3", "stages.phase1.grow: expected a table, got int 3"),
    ("run.seed={a=1}", "run.seed: expected int, got a table"),
    ("stages.phase1.losses=[3]", "stages.phase1.losses[0]: expected a table with a 'use' key, got int"),
    ("model.use=3", "model.use: required: the name of a registered model"),
])
def test_a_value_of_the_wrong_shape_is_named_by_its_key(tiny, override, problem):
    with pytest.raises(ConfigError) as info:
        tiny(override)
    assert info.value.problems == [problem]


def test_a_recipe_file_that_is_missing_or_unreadable_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"missing\.toml: 1 problem:\n  - file not found"):
        load_recipe(tmp_path / "missing.toml", [])
    (tmp_path / "folder.toml").mkdir()
    with pytest.raises(ConfigError, match=r"folder\.toml: 1 problem:\n  - cannot read the file: .*Is a directory"):
        load_recipe(tmp_path / "folder.toml", [])


def test_a_model_that_is_not_a_table_says_what_it_needs(tmp_path):
    problems = problems_of(tmp_path, 'model = 3\n[data]\nuse = "stagewise.text"\n[[stages]]\nname = "a"\n')
    assert problems == ["model: expected a table with a 'use' key, got int"]


def test_empty_split_fractions_show_the_form_they_take(tmp_path):
    (tmp_path / "c.csv").write_text("x,y\n1,0\n2,1\n")
    path = tmp_path / "c.toml"
    path.write_text(CLASSES)
    with pytest.raises(ConfigError) as info:
        load_recipe(path, ["data.splits={}"])
    assert str(info.value).endswith("\n  - data.splits (from --set data.splits={}): must be a table of split name -> "
                                    "fraction, e.g. {train = 0.8, valid = 0.1, test = 0.1}; got {}")


def test_toml_writer_writes_nan_and_refuses_what_toml_cannot_hold():
    from stagewise.tomlwrite import toml_value

    assert toml_value(math.nan) == "nan"
    with pytest.raises(TypeError, match=r"cannot write set \{1\} as TOML"):
        toml_value({1})


def test_names_differing_in_case_and_normalisation_at_once_say_both():
    from stagewise.names import alike, how_alike

    (group,) = alike(["Caf\u00e9", "cafe\u0301"])
    assert how_alike(group) == "differ only in case and Unicode normalisation, so they are one file on macOS"
