"""What the torchrun tests share: a tiny recipe, and running it in one process and as a 2-process
gloo job (``torchrun --standalone --nproc_per_node=2``), each in a child process that a timeout stops
with every process it started.

``[data] batch_size`` is the global batch: each rank trains on half of every global batch and DDP
averages the gradients, so the two runs take the same optimizer steps and their final metrics agree up
to the order of float sums (``REL_TOL``).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch.distributed as dist

from stagewise.testing import run_child

needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)

RECIPE = """\
[run]
name = "ddp"
seed = 7
device = "cpu"
threads = 1
log_every_n_steps = 1

[data]
use = "stagewise.text"
max_tokens = 2000   # 222 training windows of seq_len + 1 tokens
seq_len = 8
batch_size = 8      # global: 4 per rank with 2 processes
drop_last = true    # every global batch is whole, so both ranks always get 4 examples

[model]
use = "stagewise.transformer"
n_layer = 1
n_embd = 16
n_head = 2
ffn_hidden = 32

[[stages]]
name = "train"
use = "stagewise.train"
max_epochs = 2
max_steps_per_epoch = 6
lr = 3e-3
grad_clip = 1.0
"""

REL_TOL = 1e-4  # the two runs sum the same numbers in a different order
TIMEOUT_S = 120  # a rank waiting on a collective the other never joins must not hang the suite


def environment() -> dict[str, str]:
    """This environment without any torchrun variables (pytest itself may run under one)."""
    launcher = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"}
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    env["OMP_NUM_THREADS"] = "1"
    return env


def child(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``python ARGS`` in ``cwd``; past TIMEOUT_S it is stopped with every process it started (torchrun's workers)."""
    return run_child([sys.executable, *args], timeout=TIMEOUT_S, cwd=cwd, env=environment())


def run_python(args: list[str], cwd: Path) -> None:
    done = child(args, cwd)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"


def single_and_ddp(root: Path, recipe: str) -> SimpleNamespace:
    (root / "recipe.toml").write_text(recipe)
    run_python(["-m", "stagewise", "run", "recipe.toml", "--out", "single", "--quiet"], root)
    run_python(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "-m", "stagewise", "run", "recipe.toml", "--out", "ddp", "--quiet"], root)
    return SimpleNamespace(root=root, single=root / "single", ddp=root / "ddp")


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_close(actual: dict, expected: dict, where: str) -> None:
    assert actual.keys() == expected.keys(), where
    for key, want in expected.items():
        got = actual[key]
        if isinstance(want, float):
            assert math.isclose(got, want, rel_tol=REL_TOL), f"{where} {key}: {got} != {want}"
        else:
            assert got == want, f"{where} {key}: {got!r} != {want!r}"


def torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return child(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "stagewise", *args], cwd)


# `python launch.py ARGS`: the stagewise CLI with one extra loss term (LOSS, class CLASS) registered
LAUNCHER = '''\
import sys

import torch

import stagewise
from stagewise.cli.main import main
from stagewise.plugins import register_plugin

LOSS


class Plugin:
    @stagewise.hookimpl
    def stagewise_register_losses(self, register):
        register(CLASS)

    @stagewise.hookimpl
    def stagewise_after_stage(self, state):  # the term's parameters, for the test to read
        if state.dist.rank == 0:
            torch.save({k: v.detach() for k, v in state.terms[CLASS.name.split(".")[1]].state_dict().items()},
                       "term.pt")


register_plugin(Plugin(), "ddptest")
sys.exit(main(sys.argv[1:]))
'''


def launcher(loss: str, cls: str) -> str:
    return LAUNCHER.replace("LOSS", loss).replace("CLASS", cls)
