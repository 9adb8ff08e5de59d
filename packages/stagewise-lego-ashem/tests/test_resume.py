"""An ASHEM run killed with SIGKILL and resumed ends with exactly the numbers and records of an
uninterrupted one: the cache and router artifacts, the grown model and phase 2's place in the
cache come back from the checkpoint."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

import pytest
from conftest import TINY, read_summary

from stagewise.engine.checkpoint import load_checkpoint
from stagewise.engine.runner import run_recipe
from stagewise.recipe import load_recipe

# The CLI in a child process that SIGKILLs itself after step N of a stage ("step STAGE N"), or
# as a stage starts, once the stage before it has written its checkpoint ("stage STAGE 0").
KILLER = textwrap.dedent("""
    import os, signal, sys
    import stagewise
    from stagewise.plugins import register_plugin
    from stagewise.cli.main import main

    event, stage, step = sys.argv[1], sys.argv[2], int(sys.argv[3])

    class Killer:
        @stagewise.hookimpl
        def stagewise_after_step(self, state):
            if event == "step" and (state.stage_name, state.step) == (stage, step):
                os.kill(os.getpid(), signal.SIGKILL)

        @stagewise.hookimpl
        def stagewise_before_stage(self, state):
            if event == "stage" and state.stage_name == stage:
                os.kill(os.getpid(), signal.SIGKILL)

    register_plugin(Killer(), "killer")
    sys.exit(main(sys.argv[4:]))
""")


def _overrides(context):
    return ["run.log_every_n_steps=1", "run.checkpoint_every_n_steps=3", f'stages.phase2.context="{context}"']


def _records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]


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
@pytest.mark.parametrize("context, event, stage, step, last", [
    ("full", "stage", "phase2", 0, ("mine", True, None)),  # right after mine: cache from the checkpoint, grow again
    ("full", "step", "phase2", 10, ("phase2", False, (1, 1))),  # epoch 1 of the cache, a step after its checkpoint
    ("token", "step", "phase2", 10, ("phase2", False, (1, 1))),  # the same with the hard tokens alone
], ids=["after-mine", "phase2-full", "phase2-token"])
def test_resume_after_sigkill_matches_uninterrupted_run(whole, tmp_path, context, event, stage, step, last):
    path, uninterrupted = whole(context)
    sets = [arg for o in _overrides(context) for arg in ("--set", o)]
    killed = tmp_path / "killed"
    child = subprocess.run([sys.executable, "-c", KILLER, event, stage, str(step), "run", str(path),
                            "--out", str(killed), "--quiet", *sets], capture_output=True, text=True)
    assert child.returncode == -signal.SIGKILL, child.stderr
    saved = load_checkpoint(killed / "checkpoints" / "last.pt")
    position = (saved["loop"]["epoch"], saved["loop"]["batch"]) if "loop" in saved else None
    assert (saved["stage_name"], saved["stage_done"], position) == last

    resumed = subprocess.run([sys.executable, "-m", "stagewise", "run", str(path), "--resume", str(killed),
                              "--quiet", *sets], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert read_summary(killed)["metrics"] == read_summary(uninterrupted)["metrics"]
    assert _records(killed) == _records(uninterrupted)
