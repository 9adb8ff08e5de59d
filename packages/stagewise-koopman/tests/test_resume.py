"""A koopman.hybrid-style run killed with SIGKILL and resumed ends with exactly the numbers and
records of an uninterrupted one: the term's φ, K, ψ, its DMD buffer, the epoch's fallback and
warning counts and the operators handed to forward_eval come back from the checkpoint."""

from __future__ import annotations

import json

import pytest
from conftest import TINY_HYBRID

from stagewise.engine.checkpoint import load_checkpoint
from stagewise.engine.runner import run_recipe
from stagewise.recipe import load_recipe
from stagewise.testing import resume_run, run_killed, timeless_records

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
