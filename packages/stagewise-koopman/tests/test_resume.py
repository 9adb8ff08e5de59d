"""A koopman.hybrid-style run killed with SIGKILL and resumed ends with exactly the numbers and
records of an uninterrupted one: the term's φ, K, ψ, its DMD buffer, the epoch's fallback and
warning counts and the operators handed to forward_eval come back from the checkpoint."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

import pytest
from conftest import TINY_HYBRID

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

OVERRIDES = ["run.checkpoint_every_n_steps=1"]


def _records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]


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
@pytest.mark.parametrize("event, stage, step, last", [
    ("step", "warmup", 1, None),  # before any checkpoint: the run starts over in its folder
    ("step", "main", 6, ("main", False, (1, 2))),  # after the fallback, the buffer filled, before the refresh
    ("step", "main", 8, ("main", False, (2, 1))),  # after the refresh and the epoch's koopman.epoch record
    ("stage", "forward", 0, ("main", True, None)),  # right after main: forward_eval's operators from the checkpoint
], ids=["before-any-checkpoint", "main-before-refresh", "main-after-refresh", "after-main"])
def test_resume_after_sigkill_matches_uninterrupted_run(whole, tmp_path, event, stage, step, last):
    path, uninterrupted = whole
    sets = [arg for o in OVERRIDES for arg in ("--set", o)]
    killed = tmp_path / "killed"
    child = subprocess.run([sys.executable, "-c", KILLER, event, stage, str(step), "run", str(path),
                            "--out", str(killed), "--quiet", *sets], capture_output=True, text=True)
    assert child.returncode == -signal.SIGKILL, child.stderr
    if last is None:
        assert not (killed / "checkpoints" / "last.pt").exists()
    else:
        saved = load_checkpoint(killed / "checkpoints" / "last.pt")
        position = (saved["loop"]["epoch"], saved["loop"]["batch"]) if "loop" in saved else None
        assert (saved["stage_name"], saved["stage_done"], position) == last

    resumed = subprocess.run([sys.executable, "-m", "stagewise", "run", str(path), "--resume", str(killed),
                              "--quiet", *sets], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert _summary(killed) == _summary(uninterrupted)
    assert _records(killed) == _records(uninterrupted)
    fallbacks = [r.get("warnings/fallback/koopman", 0) for r in _records(killed)
                 if r["event"] == "epoch" and r["stage"] == "main"]
    assert fallbacks == [0, 1, 0]  # the counts the resumed epochs must keep
