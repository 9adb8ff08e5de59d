"""A koopman.hybrid-style run killed with SIGKILL and resumed ends with exactly the numbers and
records of an uninterrupted one: the term's φ, K, ψ, its DMD buffer, the epoch's fallback and
warning counts and the operators handed to forward_eval come back from the checkpoint."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import TINY_HYBRID
from stagewise_koopman import load_term

from stagewise.engine.checkpoint import load_checkpoint
from stagewise.engine.runner import run_recipe
from stagewise.errors import CheckpointError
from stagewise.recipe import load_recipe
from stagewise.testing import damaged_copy, resume_run, run_killed, run_stopped, timeless_records

OVERRIDES = ["run.checkpoint_every_n_steps=1"]


def _summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())["metrics"]


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """(the tiny hybrid recipe file, an uninterrupted run of it)."""
    folder = tmp_path_factory.mktemp("resume")
    path = folder / "tiny_hybrid.toml"
    path.write_text(TINY_HYBRID)
    return path, run_recipe(load_recipe(path, OVERRIDES), out=folder / "whole", quiet=True)


# main: 3 steps an epoch, the term from epoch 1 (steps 4-6, one fallback at step 5), a DMD
# refresh at step 6 once the buffer holds 16 fresh pairs; a checkpoint after every step
@pytest.mark.parametrize("stage, step, last", [
    ("warmup", 1, None),  # before any checkpoint: the run starts over in its folder
    ("main", 6, ("main", False, (1, 2))),  # after the fallback, the buffer filled, before the refresh
    ("main", 8, ("main", False, (2, 1))),  # after the refresh and the epoch's koopman.epoch record
    ("forward", 0, ("main", True, None)),  # right after main: forward_eval's operators from the checkpoint
], ids=["before-any-checkpoint", "main-before-refresh", "main-after-refresh", "after-main"])
def test_resume_after_sigkill_matches_uninterrupted_run(whole, tmp_path, stage, step, last):
    path, uninterrupted = whole
    killed = tmp_path / "killed"
    run_killed(path, killed, stage, step, OVERRIDES)
    if last is None:
        assert not (killed / "checkpoints" / "last.pt").exists()
    else:
        saved = load_checkpoint(killed / "checkpoints" / "last.pt")
        position = (saved["loop"]["epoch"], saved["loop"]["batch"]) if "loop" in saved else None
        assert (saved["stage_name"], saved["stage_done"], position) == last

    resume_run(path, killed, OVERRIDES)
    assert _summary(killed) == _summary(uninterrupted)
    records = timeless_records(killed)
    assert records == timeless_records(uninterrupted)
    fallbacks = [r.get("warnings/fallback/koopman", 0) for r in records
                 if r["event"] == "epoch" and r["stage"] == "main"]
    assert fallbacks == [0, 1, 0]  # the counts the resumed epochs must keep


# --- a last.pt whose trained term is not what the run wrote --------------------------------------------------


@pytest.fixture(scope="module")
def stopped_before_forward(tmp_path_factory):
    """The tiny hybrid recipe stopped as forward_eval began: its last.pt (main's end) holds the trained term."""
    folder = tmp_path_factory.mktemp("stopped")
    (folder / "tiny_hybrid.toml").write_text(TINY_HYBRID)
    recipe = load_recipe(folder / "tiny_hybrid.toml")
    return recipe, run_stopped(recipe, folder / "run", "forward")


def _term(artifacts):
    return artifacts["koopman.operators"]["koopman"]


# each found by fuzzing (a value inside last.pt's artifacts changed, then resumed): each was a traceback, or an
# allocation that ran the machine out of memory (n_hidden: a range of a billion source layers)
_DAMAGE = [
    ("missing", lambda a: a["koopman.operators"].clear(),  # KeyError
     "artifacts.koopman.operators: lacks koopman, the term an earlier stage trained"),
    ("float", lambda a: a["koopman.operators"].update(koopman=float("nan")),  # TypeError: not subscriptable
     "artifacts.koopman.operators.koopman: a float, expected a table of options, n_hidden, width, sources, state"),
    ("option-type", lambda a: _term(a)["options"].update(koopman_dim="x"),  # TypeError in __post_init__
     "artifacts.koopman.operators.koopman.options.koopman_dim: expected int"),
    ("n-hidden", lambda a: _term(a).update(n_hidden=10**9),  # out of memory
     "artifacts.koopman.operators.koopman.n_hidden: 1000000000, but sources lists 3 layers (expected 4)"),
    ("width", lambda a: _term(a).update(width=-1),  # RuntimeError: negative dimension
     "artifacts.koopman.operators.koopman.width: -1, expected a whole number >= 1"),
    ("sources", lambda a: _term(a)["sources"].__setitem__(2, torch.zeros(2)),  # unread by the rebuild: was taken
     "artifacts.koopman.operators.koopman.sources: a list, expected a list of layer numbers"),
    ("state-shape", lambda a: _term(a)["state"].update(decode_weight=torch.zeros(3, 8, 15)),  # load_state_dict
     "artifacts.koopman.operators.koopman.state.decode_weight: a torch.float32 tensor of shape (3, 8, 15), expected "
     "a torch.float32 tensor of shape (3, 8, 16)"),
    ("operator-nan", lambda a: _term(a)["state"]["operator"].fill_(float("nan")),  # svd's _LinAlgError
     "artifacts.koopman.operators.koopman.state.operator: holds values that are not finite"),
]


@pytest.mark.parametrize("damage, problem", [d[1:] for d in _DAMAGE], ids=[d[0] for d in _DAMAGE])
def test_resume_refuses_a_trained_term_the_run_did_not_write_by_key(stopped_before_forward, tmp_path, damage,
                                                                     problem):
    recipe, stopped = stopped_before_forward
    run = damaged_copy(stopped, tmp_path / "run", lambda saved: damage(saved["artifacts"]))
    last = run / "checkpoints" / "last.pt"
    with pytest.raises(CheckpointError) as info:
        run_recipe(recipe, resume=run, quiet=True)
    assert str(info.value).startswith(f"{last}: a damaged stagewise checkpoint: what it holds is not what a run "
                                      f"writes there: {problem}")
    assert f"Copy {run / 'checkpoints' / 'main.pt'} (stage 'main', the last one that finished) over" in str(info.value)
    with pytest.raises(CheckpointError, match=r"last\.pt: (holds no trained|not the trained term a run writes: )"):
        load_term(run)  # the same checkpoint read by the plugin's own loader


def test_a_resume_of_an_untouched_term_passes_the_checks(stopped_before_forward, tmp_path):
    recipe, stopped = stopped_before_forward
    run = shutil.copytree(stopped, tmp_path / "run")
    run_recipe(recipe, resume=run, quiet=True)
    assert "forward/koopman_ppl" in _summary(run)
