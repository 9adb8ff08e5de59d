"""Run folders another version of stagewise wrote, met by this one: a checkpoint records the versions that
wrote it, and a resume by other code, which would end with neither code's numbers, is refused saying so;
a file in a newer format is named as one. Older and newer folders are made here by editing this version's."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import read_summary

import stagewise
from stagewise.engine.checkpoint import load_checkpoint
from stagewise.engine.runner import run_recipe
from stagewise.errors import CheckpointError
from stagewise.testing import damaged_copy, run_stopped

# the answer to a checkpoint other code wrote: why it is not resumed, and what to do instead
OTHER_CODE = ("a run continued by other code may end with the numbers of neither code's uninterrupted run. "
              "Finish it with the code that started it, or run the recipe again with --out and a new folder")


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """The tiny recipe stopped after step 3 of phase2 (its last.pt written at phase1's end), and an
    uninterrupted run of it: (stopped run, whole run)."""
    from conftest import TINY

    from stagewise.recipe import load_recipe

    folder = tmp_path_factory.mktemp("upgrade")
    (folder / "tiny.toml").write_text(TINY)
    recipe = load_recipe(folder / "tiny.toml")
    return run_stopped(recipe, folder / "stopped", "phase2", 3), run_recipe(recipe, out=folder / "whole", quiet=True)


def _as_old(saved):
    """A checkpoint as the stagewise of 2026-11-25 wrote it: no versions, and a recipe without the keys added since."""
    saved.pop("versions", None)
    del saved["recipe"]["run"]["precision"]
    for stage in saved["recipe"]["stages"]:
        stage.pop("accumulate_batches", None)  # a training stage's


def test_a_checkpoint_records_the_versions_of_stagewise_and_its_plugins_that_wrote_it(stopped):
    saved = load_checkpoint(stopped[0] / "checkpoints" / "last.pt")
    assert saved["versions"]["stagewise"] == stagewise.__version__  # was: no record of the code that wrote it


def test_a_checkpoint_an_earlier_stagewise_wrote_is_not_resumed_and_the_error_says_why(tiny, stopped, tmp_path):
    # was: "the recipe differs ...: run.precision = "fp32" (the run started with unset), ...", keys the user never set,
    # and its advice, to resume with the run's own recipe.toml, failed with the same error
    run = damaged_copy(stopped[0], tmp_path / "old", _as_old)
    records = (run / "metrics.jsonl").read_bytes()
    for recipe in (tiny(), stagewise.load_recipe(run / "recipe.toml")):
        with pytest.raises(CheckpointError) as info:
            run_recipe(recipe, resume=run, quiet=True)
        assert str(info.value) == (f"{run / 'checkpoints' / 'last.pt'}: written by an earlier stagewise, which did "
                                   f"not record its version in checkpoints; {OTHER_CODE}")
    assert (run / "metrics.jsonl").read_bytes() == records  # refused before anything was touched


@pytest.mark.parametrize("version", ["0.0.1", "9.0.0"])
def test_a_checkpoint_another_version_of_stagewise_wrote_is_not_resumed_naming_both_versions(tiny, stopped, tmp_path,
                                                                                             version):
    run = damaged_copy(stopped[0], tmp_path / "other", lambda saved: saved.update(versions={"stagewise": version}))
    with pytest.raises(CheckpointError) as info:
        run_recipe(tiny(), resume=run, quiet=True)  # was: resumed, by code whose numbers may differ
    assert str(info.value) == (f"{run / 'checkpoints' / 'last.pt'}: written with stagewise {version}, not the "
                               f"stagewise {stagewise.__version__} installed now; a run continued by other code may "
                               f"end with the numbers of neither code's uninterrupted run. Finish it with the code "
                               f"that started it (pip install stagewise=={version}), or run the recipe again with "
                               f"--out and a new folder")


def test_a_checkpoint_another_torch_wrote_is_not_resumed_naming_both(tiny, stopped, tmp_path):
    # another torch may round differently: the continued run would end with the numbers of neither
    assert load_checkpoint(stopped[0] / "checkpoints" / "last.pt")["versions"]["torch"] == torch.__version__
    run = damaged_copy(stopped[0], tmp_path / "torch", lambda saved: saved["versions"].update(torch="2.0.0"))
    with pytest.raises(CheckpointError, match=rf"last\.pt: written with torch 2\.0\.0, not the torch "
                                              rf"{re.escape(torch.__version__)} installed now; .* \(pip install "
                                              r"torch==2\.0\.0\)"):
        run_recipe(tiny(), resume=run, quiet=True)


def test_a_checkpoint_written_before_torch_was_recorded_resumes_as_before(tiny, stopped, tmp_path):
    # checkpoints of stagewise 6ffc321 to 6feb3f2 record stagewise's and the plugins' versions, not torch's
    run = damaged_copy(stopped[0], tmp_path / "no-torch", lambda saved: saved["versions"].pop("torch"))
    run_recipe(tiny(), resume=run, quiet=True)
    assert read_summary(run)["metrics"] == read_summary(stopped[1])["metrics"]

def test_a_plugin_installed_then_but_gone_now_does_not_stop_a_resume(tiny, stopped, tmp_path):
    # the recipe is checked for the names it uses; a plugin it does not use (this one) changes nothing
    run = damaged_copy(stopped[0], tmp_path / "gone", lambda saved: saved["versions"].update({"stagewise-gone": "1"}))
    run_recipe(tiny(), resume=run, quiet=True)
    assert read_summary(run)["metrics"] == read_summary(stopped[1])["metrics"]


def test_versions_a_run_never_writes_are_a_damaged_checkpoint(tiny, stopped, tmp_path):
    run = damaged_copy(stopped[0], tmp_path / "bad", lambda saved: saved.update(versions=["stagewise"]))
    with pytest.raises(CheckpointError, match=r"last\.pt: a damaged stagewise checkpoint: .*: versions: a list, "
                                              r"expected a table of distributions and their versions"):
        run_recipe(tiny(), resume=run, quiet=True)


def test_other_code_of_the_same_versions_is_named_by_the_recipe_it_reads_otherwise(tiny, stopped, tmp_path):
    # code between two releases: the version check passes, the recipe it saved says what changed. Was: "Resume
    # with ... the recipe it saved: stagewise run RUN/recipe.toml --resume RUN", which failed the same way
    run = damaged_copy(stopped[0], tmp_path / "dev", lambda saved: saved["recipe"]["run"].pop("precision"))
    with pytest.raises(CheckpointError) as info:
        run_recipe(stagewise.load_recipe(run / "recipe.toml"), resume=run, quiet=True)
    assert str(info.value) == (f"{run / 'checkpoints' / 'last.pt'}: written by other code of the same versions: this "
                               f"code reads the recipe it saved otherwise (run.precision = \"fp32\" (the run started "
                               f"with unset)); {OTHER_CODE}")


def _before_first_checkpoint(tiny, folder, edit):
    """A run stopped as phase1 started (no checkpoint yet), its recipe.toml edited by ``edit`` (text -> text)."""
    run = run_stopped(tiny(), folder, "phase1", 0)
    (run / "recipe.toml").write_text(edit((run / "recipe.toml").read_text()))
    return run


def test_a_run_an_earlier_stagewise_stopped_before_its_first_checkpoint_starts_over(tiny, stopped, tmp_path):
    # nothing of it is continued, so nothing mixes: its recipe.toml lacks the keys added since, which take their
    # defaults. Was: refused as "the recipe differs", with advice that failed the same way
    run = _before_first_checkpoint(tiny, tmp_path / "old", lambda text: re.sub(r"\nprecision = .*", "", text))
    run_recipe(tiny(), resume=run, quiet=True)
    assert read_summary(run)["metrics"] == read_summary(stopped[1])["metrics"]
    assert "precision" in (run / "recipe.toml").read_text()  # written anew, as this version writes it


def test_a_run_started_with_a_key_this_version_lacks_is_refused_naming_the_key(tiny, tmp_path):
    run = _before_first_checkpoint(tiny, tmp_path / "newer", lambda text: text.replace("[run]", "[run]\nfuture = 1"))
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(run / 'recipe.toml'))}: the recipe this run started "
                                              rf"with does not load with the stagewise and plugins installed now "
                                              rf"\(run\.future: unknown key.*\): another version started it, or a "
                                              rf"plugin it used is gone; run the recipe again with --out"):
        run_recipe(tiny(), resume=run, quiet=True)  # was: "run.future = unset (the run started with 1)"


@pytest.mark.parametrize(("versions", "writer"), [({"stagewise": "0.9.0"}, "stagewise 0.9.0"),
                                                  (None, "a newer stagewise")])
def test_a_checkpoint_in_a_newer_format_is_named_as_one(stopped, tmp_path, versions, writer):
    def newer(saved):
        saved.update(format="stagewise-checkpoint-2", versions=versions)

    last = damaged_copy(stopped[0], tmp_path / "newer", newer) / "checkpoints" / "last.pt"
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(last)  # was: "not a stagewise checkpoint (expected format 'stagewise-checkpoint-1')"
    assert str(info.value) == (f"{last}: written by {writer} in format 'stagewise-checkpoint-2', which stagewise "
                               f"{stagewise.__version__} cannot read (it reads 'stagewise-checkpoint-1'); upgrade "
                               f"stagewise and its plugins to read it (pip install -U stagewise)")


def test_a_file_of_another_format_is_still_no_stagewise_checkpoint(tmp_path):
    torch.save({"format": "other-checkpoint-2"}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match=r"x\.pt: not a stagewise checkpoint"):
        load_checkpoint(tmp_path / "x.pt")
