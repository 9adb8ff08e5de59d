"""A run killed with SIGKILL and resumed ends with exactly the numbers of an uninterrupted run."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest
from conftest import read_records, read_summary

from stagewise.engine.checkpoint import load_checkpoint
from stagewise.engine.runner import run_recipe
from stagewise.errors import CheckpointError

# Runs the CLI in a child process that SIGKILLs itself after a given step of a given stage.
KILLER = textwrap.dedent("""
    import os, signal, sys
    import stagewise
    from stagewise.plugins import register_plugin
    from stagewise.cli.main import main

    stage, step = sys.argv[1], int(sys.argv[2])

    class Killer:
        @stagewise.hookimpl
        def stagewise_after_step(self, state):
            if state.stage_name == stage and state.step == step:
                os.kill(os.getpid(), signal.SIGKILL)

    register_plugin(Killer(), "killer")
    sys.exit(main(sys.argv[3:]))
""")


def _without_timing(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


@pytest.mark.parametrize("stage, step", [("phase1", 7), ("phase2", 4)])
def test_resume_after_sigkill_matches_uninterrupted_run(tiny_recipe_path, tiny, tmp_path, stage, step):
    overrides = ["--set", "run.checkpoint_every_n_steps=3"]
    killed = tmp_path / "killed"
    child = subprocess.run([sys.executable, "-c", KILLER, stage, str(step), "run", str(tiny_recipe_path),
                            "--out", str(killed), "--quiet", *overrides], capture_output=True, text=True)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert not (killed / "summary.json").exists()
    saved = load_checkpoint(killed / "checkpoints" / "last.pt")
    assert saved["stage_name"] == stage and not saved["stage_done"]  # died mid-stage

    resumed = subprocess.run([sys.executable, "-m", "stagewise", "run", str(tiny_recipe_path), "--resume",
                              str(killed), "--quiet", *overrides], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr

    whole = run_recipe(tiny("run.checkpoint_every_n_steps=3"), out=tmp_path / "whole", quiet=True)
    assert read_summary(killed)["metrics"] == read_summary(whole)["metrics"]
    assert _without_timing(read_records(killed)) == _without_timing(read_records(whole))


def test_resume_refuses_a_changed_recipe(tiny, tmp_path):
    run_dir = run_recipe(tiny(), out=tmp_path / "run", quiet=True)
    with pytest.raises(CheckpointError, match="recipe differs"):
        run_recipe(tiny("stages.phase1.lr=0.5"), resume=run_dir, quiet=True)


def test_corrupt_checkpoint_gives_a_clear_error(tiny, tmp_path):
    run_dir = run_recipe(tiny(), out=tmp_path / "run", quiet=True)
    last = run_dir / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # truncated
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        run_recipe(tiny(), resume=run_dir, quiet=True)


def test_foreign_file_is_not_a_checkpoint(tmp_path):
    import torch

    path = tmp_path / "x.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not a stagewise checkpoint"):
        load_checkpoint(path)
