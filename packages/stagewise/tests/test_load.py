"""stagewise.load_model: a trained model back from its run directory or a stage's checkpoint."""

from __future__ import annotations

import re
import shutil
import warnings

import pytest
import torch
from conftest import CLASSES, TINY

import stagewise
from stagewise.data import Vocabulary
from stagewise.engine.checkpoint import load_checkpoint, write_checkpoint
from stagewise.engine.runner import run_recipe
from stagewise.errors import CheckpointError
from stagewise.recipe import load_recipe


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("load")
    (folder / "tiny.toml").write_text(TINY)
    return run_recipe(load_recipe(folder / "tiny.toml"), out=folder / "run", quiet=True)


def _same_weights(model: torch.nn.Module, checkpoint) -> bool:
    saved = load_checkpoint(checkpoint)["model"]
    state = model.state_dict()
    return state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in saved)


def test_the_run_directory_gives_the_grown_model_with_its_last_weights(tiny_run):
    model = stagewise.load_model(tiny_run)
    assert not model.training and len(model.layers) == 3  # phase2 grew it from 2 layers to 3
    assert _same_weights(model, tiny_run / "checkpoints" / "last.pt")
    vocab = Vocabulary.from_file(tiny_run / "vocab.txt")
    ids = torch.tensor([vocab.encode("the old man".split())])
    assert model(ids)["logits"].shape == (1, 3, len(vocab))


def test_a_stage_checkpoint_gives_the_model_as_that_stage_left_it(tiny_run):
    model = stagewise.load_model(tiny_run / "checkpoints" / "phase1.pt")
    assert len(model.layers) == 2 and _same_weights(model, tiny_run / "checkpoints" / "phase1.pt")


def test_a_model_built_from_tabular_data_is_rebuilt_from_the_facts_the_checkpoint_kept(tmp_path):
    (tmp_path / "c.csv").write_text("a,b,y\n" + "".join(f"{i},{i % 2},{i % 3}\n" for i in range(8)))
    (tmp_path / "r.toml").write_text(CLASSES)
    run = run_recipe(load_recipe(tmp_path / "r.toml", ['data.target_dtype="long"', "run.threads=1"]),
                     out=tmp_path / "run", quiet=True)
    (tmp_path / "c.csv").unlink()  # the data is not needed to load the model
    model = stagewise.load_model(run)
    assert load_checkpoint(run / "checkpoints" / "last.pt")["data_info"]["n_features"] == 2
    assert _same_weights(model, run / "checkpoints" / "last.pt")


def test_a_checkpoint_without_data_info_says_what_to_do(tiny_run, tmp_path):
    saved = load_checkpoint(tiny_run / "checkpoints" / "last.pt")
    del saved["data_info"], saved["format"]  # as written before checkpoints kept it
    old = tmp_path / "old.pt"
    write_checkpoint(saved, [old])
    with pytest.raises(CheckpointError, match=r"old\.pt: written by a stagewise that did not keep the data's facts "
                                              r".*; run the recipe again to load its model"):
        stagewise.load_model(old)
    with pytest.raises(CheckpointError, match=r"nothing\.pt: checkpoint not found"):
        stagewise.load_model(tmp_path / "nothing.pt")


def test_a_model_whose_plugin_is_missing_is_named(tiny_run, tmp_path):
    saved = load_checkpoint(tiny_run / "checkpoints" / "last.pt")
    saved["recipe"]["model"]["use"] = "nosuch.lm"
    del saved["format"]
    write_checkpoint(saved, [tmp_path / "foreign.pt"])
    with pytest.raises(CheckpointError, match=r"foreign\.pt: cannot rebuild its model: model\.use: unknown model "
                                              r"'nosuch\.lm'"):
        stagewise.load_model(tmp_path / "foreign.pt")


def test_a_checkpoint_written_part_way_through_a_stage_warns_and_names_the_finished_ones(tiny_run, tmp_path):
    # was: a stopped run's last.pt loaded like a trained model, unsaid (export notes it)
    saved = load_checkpoint(tiny_run / "checkpoints" / "last.pt")
    saved["stage_done"] = False
    del saved["format"]
    write_checkpoint(saved, [tmp_path / "last.pt"])
    with pytest.warns(UserWarning, match=r"last\.pt was written part-way through stage '\w+', so the model has its "
                                         r"weights at that point; no stage has finished yet: resume the run"):
        stagewise.load_model(tmp_path / "last.pt")
    shutil.copy(tiny_run / "checkpoints" / "phase1.pt", tmp_path)
    with pytest.warns(UserWarning, match=re.escape(f"; load one of phase1.pt in {tmp_path} for a finished stage's")):
        stagewise.load_model(tmp_path / "last.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stagewise.load_model(tiny_run)  # a finished run's last.pt
