"""A run of the example plugin's stages, interrupted mid-stage and resumed, ends with the
numbers of an uninterrupted one: the artifact and the hard-example batches survive the restart."""

from __future__ import annotations

import json

import pytest

import stagewise
from stagewise import plugins
from stagewise.engine.checkpoint import load_checkpoint
from stagewise.engine.runner import run_recipe
from stagewise.recipe import load_recipe


class Interrupted(Exception):
    """Stands in for a killed process."""


class StopInHardStage:
    """A plugin that stops the run after step 4 of stage "hard", its 2nd epoch's 2nd batch:
    one step after the mid-epoch checkpoint that ``checkpoint_every_n_steps = 1`` writes."""

    @stagewise.hookimpl
    def stagewise_after_step(self, state):
        if state.stage_name == "hard" and state.step == 4:
            raise Interrupted


def steps(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["stage"], r["step"], r["train/loss"]) for r in map(json.loads, lines) if r["event"] == "step"]


def test_resumed_run_matches_the_uninterrupted_one(recipes, example_run, tmp_path):
    recipe = load_recipe(recipes["example"], ["run.checkpoint_every_n_steps=1"])
    plugins.register_plugin(StopInHardStage(), "stop_in_hard_stage")
    try:
        with pytest.raises(Interrupted):
            run_recipe(recipe, out=tmp_path / "run", quiet=True)
    finally:
        plugins.unregister_plugin("stop_in_hard_stage")
    saved = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert (saved["stage_name"], saved["stage_done"], saved["loop"]["epoch"], saved["loop"]["batch"]) == \
        ("hard", False, 1, 1)

    run_dir = run_recipe(recipe, resume=tmp_path / "run", quiet=True)
    resumed = json.loads((run_dir / "summary.json").read_text())["metrics"]
    assert resumed == json.loads((example_run / "summary.json").read_text())["metrics"]
    assert steps(run_dir) == steps(example_run)
