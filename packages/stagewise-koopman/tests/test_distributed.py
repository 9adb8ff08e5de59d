"""Under torchrun every rank ends a stage with the same K, DMD refresh included, and reports
the same forward-mode and linearity figures.

Each rank fits K from its own share of the batches; without sharing rank 0's fit, the ranks'
operators drift apart (DDP keeps only their gradients in step). ``koopman.forward_eval`` and
``koopman.linearity`` read their splits whole on every rank. Two gloo processes train a tiny
model with ``dmd_every``; each saves its K after the main stage and its metrics after each stage.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from conftest import TINY_HYBRID, TRAIN_ONLY

# Saves each rank's K after the main stage and its figures after each stage, next to the run directory.
DRIVER = """\
import json
import math
import torch
import stagewise
from stagewise import plugins
from stagewise.engine.runner import run_recipe
from stagewise.recipe import load_recipe


class SaveOperator:
    @stagewise.hookimpl
    def stagewise_after_stage(self, state):
        if state.stage_name == "main":
            torch.save(state.terms["koopman"].koopman.operator.detach(), f"K{state.dist.rank}.pt")
        with open(f"metrics{state.dist.rank}.json", "w") as f:  # the last stage's call leaves every stage's
            json.dump({k: v for k, v in state.metrics.items() if k.startswith(("forward/", "linearity/"))}, f)


plugins.plugin_manager()
plugins.register_plugin(SaveOperator(), "save-operator")
run_recipe(load_recipe("recipe.toml", ["data.drop_last=true"]), out="run", quiet=True)
"""


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                    reason="torch.distributed with the gloo backend is not available in this torch build")
def test_every_rank_ends_with_the_same_operator_and_figures(tmp_path):
    (tmp_path / "recipe.toml").write_text(TINY_HYBRID)
    (tmp_path / "driver.py").write_text(DRIVER)
    launcher = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"}
    env = {**{k: v for k, v in os.environ.items() if k not in launcher}, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "driver.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    k0, k1 = (torch.load(tmp_path / f"K{rank}.pt", weights_only=True) for rank in (0, 1))
    assert not torch.equal(k0, torch.eye(8).repeat(3, 1, 1))  # trained and refreshed
    assert torch.equal(k0, k1)
    m0, m1 = (json.loads((tmp_path / f"metrics{rank}.json").read_text()) for rank in (0, 1))
    assert {"forward/koopman_ppl", "linearity/one_step_error"} <= m0.keys()  # read whole on every rank
    assert m0 == m1


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                    reason="torch.distributed with the gloo backend is not available in this torch build")
def test_two_processes_train_the_term_of_one(tmp_path):
    # was ~1% apart from the first step: each rank scaled the lifted error by its own half's spread
    from stagewise.testing import run_uninterrupted, timeless_records

    (tmp_path / "recipe.toml").write_text(TRAIN_ONLY)
    sets = ["data.drop_last=true", "stages.main.losses.koopman.dmd_every=0"]  # DMD fits each rank's own pairs
    for processes in (1, 2):
        run_uninterrupted(tmp_path / "recipe.toml", tmp_path / f"run{processes}", sets, processes=processes)
    one, two = ([r for r in timeless_records(tmp_path / f"run{n}") if r["event"] == "epoch" and r["stage"] == "main"]
                for n in (1, 2))
    keys = ("train/koopman/lifted", "val/koopman/lifted", "val/koopman/one_step", "val/ppl")
    pairs = [(key, a[key], b[key]) for a, b in zip(one, two, strict=True) for key in keys if key in a]
    assert len(pairs) == 11  # val/koopman/* every epoch, train/koopman/* once the term is on (epochs 2 and 3)
    assert all(math.isclose(a, b, rel_tol=1e-4) for _, a, b in pairs), pairs
