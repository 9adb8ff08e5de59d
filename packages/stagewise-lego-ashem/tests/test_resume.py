"""An ASHEM run killed with SIGKILL and resumed ends with exactly the numbers and records of an
uninterrupted one: the cache and router artifacts, the grown model and phase 2's place in the
cache come back from the checkpoint."""

from __future__ import annotations

import pytest
from conftest import TINY, read_summary

from stagewise.engine.checkpoint import load_checkpoint
from stagewise.engine.runner import run_recipe
from stagewise.recipe import load_recipe
from stagewise.testing import resume_run, run_killed, timeless_records


def _overrides(context):
    return ["run.log_every_n_steps=1", "run.checkpoint_every_n_steps=3", f'stages.phase2.context="{context}"']


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """``whole(context)``: (the recipe file, an uninterrupted run of it), run once per context."""
    folder = tmp_path_factory.mktemp("resume")
    path = folder / "tiny.toml"
    path.write_text(TINY)
    runs = {}

    def run(context):
        if context not in runs:
            recipe = load_recipe(path, _overrides(context))
            runs[context] = run_recipe(recipe, out=folder / f"whole_{context}", quiet=True)
        return path, runs[context]

    return run


# phase 2 takes 8 steps an epoch; checkpoints at steps 3 and 6 and each epoch's end
@pytest.mark.parametrize("context, stage, step, last", [
    ("full", "phase2", 0, ("mine", True, None)),  # right after mine: cache from the checkpoint, grow again
    ("full", "phase2", 10, ("phase2", False, (1, 1))),  # epoch 1 of the cache, a step after its checkpoint
    ("token", "phase2", 10, ("phase2", False, (1, 1))),  # the same with the hard tokens alone
], ids=["after-mine", "phase2-full", "phase2-token"])
def test_resume_after_sigkill_matches_uninterrupted_run(whole, tmp_path, context, stage, step, last):
    path, uninterrupted = whole(context)
    killed = tmp_path / "killed"
    run_killed(path, killed, stage, step, _overrides(context))
    saved = load_checkpoint(killed / "checkpoints" / "last.pt")
    position = (saved["loop"]["epoch"], saved["loop"]["batch"]) if "loop" in saved else None
    assert (saved["stage_name"], saved["stage_done"], position) == last

    resume_run(path, killed, _overrides(context))
    assert read_summary(killed)["metrics"] == read_summary(uninterrupted)["metrics"]
    assert timeless_records(killed) == timeless_records(uninterrupted)
    routers = [load_checkpoint(run / "checkpoints" / "last.pt")["routers"] for run in (killed, uninterrupted)]
    assert routers[0] == routers[1] and "lego_ashem.router" in routers[0]  # the kept router came back too
