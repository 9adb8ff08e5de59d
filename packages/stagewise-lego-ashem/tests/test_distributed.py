"""The ASHEM pipeline under torchrun: 2 CPU processes (gloo) end with the numbers of one.

Phase 1 trains data-parallel; ``mine`` and the probe read their splits whole on every process,
so each holds the same threshold and cache; routed evaluation sums its counts over processes.
The ranks' phase-1 weights differ from one process's in the last bits (sums in another order),
so the metrics agree to a relative 1e-3 and the token counts exactly.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
from conftest import TINY

from stagewise.testing import run_child

REL_TOL = 1e-3
LAUNCHER = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
            "MASTER_PORT", "TORCHELASTIC_RUN_ID"}


def _run(args: list[str], cwd: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER} | {"OMP_NUM_THREADS": "1"}
    done = run_child([sys.executable, *args, "--out", "run", "--quiet", "--set", "data.drop_last=true"],
                     timeout=180, cwd=cwd, env=env)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"


needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="no gloo backend in this torch")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny recipe run in one process (``single/run``) and by two (``ddp/run``)."""
    root = tmp_path_factory.mktemp("ashem")
    for name in ("single", "ddp"):
        (root / name).mkdir()
        (root / name / "tiny.toml").write_text(TINY)
    _run(["-m", "stagewise", "run", "tiny.toml"], root / "single")
    _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
          "-m", "stagewise", "run", "tiny.toml"], root / "ddp")
    return root


def _metrics(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())["metrics"]


@needs_gloo
def test_two_processes_mine_calibrate_and_evaluate_like_one(runs):
    single, ddp = _metrics(runs / "single" / "run"), _metrics(runs / "ddp" / "run")
    assert ddp["mine/tokens"] == single["mine/tokens"] == 1328  # every token of the split, on each rank
    for key in ("mine/threshold", "mine/hard_ratio", "val/ppl", "test/routed_ppl", "test/full_depth_ppl",
                "test/shallow_ratio", "test/hard_ppl_after"):
        assert math.isclose(ddp[key], single[key], rel_tol=REL_TOL), f"{key}: {ddp[key]} != {single[key]}"


@needs_gloo
def test_phase_two_trains_on_every_process_s_hard_tokens_as_one_process(runs):
    # was: each process's share of a batch of cached windows was weighed by its windows, not by its hard
    # tokens, which the loss averages over: phase 2's train/loss was 0.5% off one process's from the first epoch
    def epochs(run: Path) -> list[dict]:
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [r for r in records if r["event"] == "epoch" and r["stage"] == "phase2"]

    single, ddp = epochs(runs / "single" / "run"), epochs(runs / "ddp" / "run")
    assert len(single) == len(ddp) == 2
    for got, want in zip(ddp, single, strict=True):
        for key in ("train/loss", "val/loss"):
            assert math.isclose(got[key], want[key], rel_tol=1e-4), f"epoch {want['epoch']} {key}"
