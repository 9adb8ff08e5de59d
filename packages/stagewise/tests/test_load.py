"""stagewise.load_model: a trained model back from its run directory, a stage's checkpoint or an export."""

from __future__ import annotations

import json
import re
import shutil
import warnings

import numpy as np
import pytest
import torch
from conftest import CLASSES, TINY

import stagewise
from stagewise.data import Vocabulary
from stagewise.engine.checkpoint import load_checkpoint, write_checkpoint
from stagewise.engine.runner import run_recipe
from stagewise.errors import CheckpointError
from stagewise.export import export_npz
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


def _logits(model: torch.nn.Module, run) -> torch.Tensor:
    vocab = Vocabulary.from_file(run / "vocab.txt")
    return model(torch.tensor([vocab.encode("the old man".split())]))["logits"]


def _rewritten(export, out, arrays=None, **meta):
    """A copy of ``export`` at ``out`` with ``arrays`` for its model's and ``meta``'s keys changed (None: removed)."""
    with np.load(export, allow_pickle=False) as data:
        kept = {k: data[k] for k in data.files if k != "__meta__"}
        old = json.loads(str(data["__meta__"]))
    new = {k: v for k, v in {**old, **meta}.items() if v is not None}
    np.savez(out, **(kept if arrays is None else arrays), __meta__=np.array(json.dumps(new)))
    return out


def test_an_export_gives_the_model_its_checkpoint_gives(tiny_run, tmp_path):
    # was: refused as "an export (.npz), not a checkpoint"
    export_npz(tiny_run / "checkpoints" / "phase1.pt", tmp_path / "m.npz")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a finished stage's export
        model = stagewise.load_model(tmp_path / "m.npz")
    assert not model.training and len(model.layers) == 2
    assert _same_weights(model, tiny_run / "checkpoints" / "phase1.pt")
    from_checkpoint = stagewise.load_model(tiny_run / "checkpoints" / "phase1.pt")
    assert torch.equal(_logits(model, tiny_run), _logits(from_checkpoint, tiny_run))


def test_an_export_written_part_way_through_a_stage_warns(tiny_run, tmp_path):
    saved = load_checkpoint(tiny_run / "checkpoints" / "last.pt")
    saved["stage_done"] = False
    del saved["format"]
    write_checkpoint(saved, [tmp_path / "last.pt"])
    export_npz(tmp_path / "last.pt", tmp_path / "m.npz")
    with pytest.warns(UserWarning, match=r"m\.npz was written part-way through stage '\w+', so the model has its "
                                         r"weights at that point; export a finished stage's checkpoint "
                                         r"\(RUN_DIR/checkpoints/<stage>\.pt\)"):
        model = stagewise.load_model(tmp_path / "m.npz")
    assert _same_weights(model, tiny_run / "checkpoints" / "last.pt")


def test_an_export_that_does_not_say_whether_its_stage_finished_loads_without_a_warning(tiny_run, tmp_path):
    # as a checkpoint without stage_done loads: only stage_done = false means written part-way
    export_npz(tiny_run / "checkpoints" / "last.pt", tmp_path / "m.npz")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = stagewise.load_model(_rewritten(tmp_path / "m.npz", tmp_path / "old.npz", stage_done=None))
    assert _same_weights(model, tiny_run / "checkpoints" / "last.pt")


def test_a_run_directory_whose_name_ends_in_npz_is_a_run_directory(tiny_run, tmp_path):
    run = shutil.copytree(tiny_run, tmp_path / "run.npz")
    assert _same_weights(stagewise.load_model(run), tiny_run / "checkpoints" / "last.pt")


@pytest.mark.parametrize(("change", "message"), [
    ({"data_info": None}, r"old\.npz: exported by a stagewise that did not keep the data's facts the model is built "
                          r"from .*; export the run's checkpoint again \(stagewise export RUN_DIR old\.npz\)"),
    ({"format": None}, r"old\.npz: an \.npz that stagewise export did not write .*; give a file stagewise export "
                       r"wrote, a run directory or a \.pt checkpoint"),
    ({"model": "nosuch.lm"}, r"old\.npz: cannot rebuild its model: model\.use: unknown model 'nosuch\.lm'"),
    ({"format": "stagewise-npz-2"}, r"old\.npz: written by a newer stagewise in format 'stagewise-npz-2', which "
                                    r"stagewise \S+ cannot read \(it reads 'stagewise-npz-1'\); upgrade stagewise"),
])
def test_an_export_the_model_cannot_be_rebuilt_from_says_what_to_do(tiny_run, tmp_path, change, message):
    export_npz(tiny_run / "checkpoints" / "last.pt", tmp_path / "m.npz")
    with pytest.raises(CheckpointError, match=message):
        stagewise.load_model(_rewritten(tmp_path / "m.npz", tmp_path / "old.npz", **change))


def test_an_npz_that_is_no_export_or_is_not_there_is_refused(tmp_path):
    np.savez(tmp_path / "weights.npz", w=np.zeros(3))
    with pytest.raises(CheckpointError, match=r"weights\.npz: not a file stagewise export wrote \(KeyError"):
        stagewise.load_model(tmp_path / "weights.npz")
    with pytest.raises(CheckpointError, match=r"nothing\.npz: export not found"):
        stagewise.load_model(tmp_path / "nothing.npz")


def _exported_weights(run, export) -> dict[str, np.ndarray]:
    export_npz(run / "checkpoints" / "last.pt", export)
    with np.load(export) as data:
        return {k: data[k] for k in data.files if k != "__meta__"}


def test_weights_that_do_not_fit_the_model_are_named(tiny_run, tmp_path):
    arrays = _exported_weights(tiny_run, tmp_path / "m.npz")
    state = load_checkpoint(tiny_run / "checkpoints" / "last.pt")["model"]
    names = list(state)  # the model's order, which the message keeps
    for name in names[:4]:  # more missing than the message names
        del arrays[name]
    arrays["extra.weight"] = np.zeros(2, np.float32)
    arrays[names[4]] = np.zeros((1, 1), np.float32)
    with pytest.raises(CheckpointError, match=re.escape(
            f"bad.npz: its weights do not fit the model stagewise.transformer builds from its options (missing: "
            f"{', '.join(names[:3])}, ... (4); unexpected: extra.weight (1); of another shape: {names[4]} (1, 1), "
            f"the model's {tuple(state[names[4]].shape)} "
            f"(1)); was it written with another version of the model's plugin?")):
        stagewise.load_model(_rewritten(tmp_path / "m.npz", tmp_path / "bad.npz", arrays))
    saved = load_checkpoint(tiny_run / "checkpoints" / "last.pt")  # a checkpoint's are checked alike
    del saved["model"][names[0]], saved["format"]
    write_checkpoint(saved, [tmp_path / "bad.pt"])
    with pytest.raises(CheckpointError, match=rf"bad\.pt: its weights do not fit .*\(missing: {re.escape(names[0])} "):
        stagewise.load_model(tmp_path / "bad.pt")


def test_three_weights_that_do_not_fit_are_all_named(tiny_run, tmp_path):
    arrays = _exported_weights(tiny_run, tmp_path / "m.npz")
    names = list(load_checkpoint(tiny_run / "checkpoints" / "last.pt")["model"])
    for name in names[:3]:
        del arrays[name]
    with pytest.raises(CheckpointError, match=re.escape(f"(missing: {', '.join(names[:3])} (3)); was it written")):
        stagewise.load_model(_rewritten(tmp_path / "m.npz", tmp_path / "bad.npz", arrays))
