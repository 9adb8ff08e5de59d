"""Data-parallel training under torchrun: 2 CPU processes (gloo) end with the numbers of one.

The same tiny recipe (``ddp_jobs.RECIPE``) runs once in a single process and once as
``torchrun --standalone --nproc_per_node=2 -m stagewise run``. Only rank 0 writes the run directory.
Without torchrun, the batch split itself is checked: every rank must take the same number of
training steps, or DDP's all-reduce hangs. Loss terms under DDP are in test_distributed_terms.py,
how a job's processes start, fail and stop in test_distributed_jobs.py.
"""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from ddp_jobs import RECIPE, REL_TOL, assert_close, needs_gloo, records, run_python, single_and_ddp, summary

from stagewise.engine.batches import count_batches, iterate_batches
from stagewise.engine.checkpoint import load_checkpoint
from stagewise.engine.distributed import DistInfo
from stagewise.recipe import load_recipe
from stagewise.testing import resume_run, run_killed, run_stopped, run_terminated, timeless_records


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The recipe run single-process (``single/``) and by 2 gloo processes (``ddp/``)."""
    return single_and_ddp(tmp_path_factory.mktemp("distributed"), RECIPE)


@needs_gloo
def test_two_processes_end_with_the_single_process_metrics(runs):
    single, ddp = summary(runs.single), summary(runs.ddp)
    assert single["metrics"]["train/best_epoch"] == 1  # the runs trained: validation improved
    assert_close(ddp["metrics"], single["metrics"], "final metrics")
    for name, stage in single["stages"].items():
        assert ddp["stages"][name]["epochs"] == stage["epochs"]
        assert_close(ddp["stages"][name]["metrics"], stage["metrics"], f"stage {name}")


@needs_gloo
def test_every_epoch_matches_the_single_process_run(runs):
    def epochs(run_dir: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in records(run_dir) if r["event"] == "epoch"]

    single, ddp = epochs(runs.single), epochs(runs.ddp)
    assert len(single) == len(ddp) == 2
    for i, (got, want) in enumerate(zip(ddp, single, strict=True)):
        assert_close(got, want, f"epoch {i}")


@needs_gloo
def test_only_rank_zero_writes(runs):
    assert sorted(p.name for p in runs.root.iterdir()) == ["ddp", "recipe.toml", "single"]
    assert sorted(p.name for p in runs.ddp.iterdir()) == sorted(p.name for p in runs.single.iterdir())
    assert sorted(p.name for p in (runs.ddp / "checkpoints").iterdir()) == ["last.pt", "train.pt"]
    assert [json.loads((run / "env.json").read_text())["processes"] for run in (runs.single, runs.ddp)] == [1, 2]
    ddp, single = records(runs.ddp), records(runs.single)
    keys = [(r["event"], r["stage"], r["epoch"], r["step"]) for r in ddp]
    assert len(keys) == len(set(keys)), "a record was written twice (by more than one rank)"
    assert keys == [(r["event"], r["stage"], r["epoch"], r["step"]) for r in single]


@needs_gloo
def test_step_records_hold_the_global_batch_loss(runs):
    single = [r["train/loss"] for r in records(runs.single) if r["event"] == "step"]
    ddp = [r["train/loss"] for r in records(runs.ddp) if r["event"] == "step"]
    assert len(ddp) == len(single) == 12
    for step, (got, want) in enumerate(zip(ddp, single, strict=True), start=1):
        assert math.isclose(got, want, rel_tol=REL_TOL), f"step {step}: {got} != {want}"


@needs_gloo
def test_a_killed_torchrun_job_resumed_under_torchrun_ends_with_the_uninterrupted_numbers(runs, tmp_path):
    sets = ["run.checkpoint_every_n_steps=3"]  # last checkpoint before the kill: epoch 1, after step 6
    run_killed(runs.root / "recipe.toml", tmp_path / "killed", "train", 8, sets, processes=2)
    assert load_checkpoint(tmp_path / "killed" / "checkpoints" / "last.pt")["step"] == 6
    resume_run(runs.root / "recipe.toml", tmp_path / "killed", sets, processes=2)
    assert summary(tmp_path / "killed")["metrics"] == summary(runs.ddp)["metrics"]  # bit-identical
    assert timeless_records(tmp_path / "killed") == timeless_records(runs.ddp)


@needs_gloo
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="Windows: os.kill(SIGTERM) ends a process at once")
def test_a_torchrun_job_sent_sigterm_stops_together_and_resumes_to_the_uninterrupted_numbers(runs, tmp_path):
    # was: every process died at once (torchrun passes SIGTERM on to each), the steps since the epoch's end lost;
    # now they agree on a step in a sum they make anyway, and stop after it, once rank 0 has checkpointed it
    stopped = tmp_path / "stopped"
    stderr = run_terminated(runs.root / "recipe.toml", stopped, "train", 8, processes=2)
    assert (f"stagewise: stopped by SIGTERM after step 9 of stage 'train', checkpointed there; continue with: "
            f"torchrun --nproc_per_node=2 -m stagewise run {runs.root / 'recipe.toml'} --resume {stopped}\n") in stderr
    assert load_checkpoint(stopped / "checkpoints" / "last.pt")["step"] == 9  # the step after the signal's
    resume_run(runs.root / "recipe.toml", stopped, processes=2)
    assert summary(stopped)["metrics"] == summary(runs.ddp)["metrics"]  # bit-identical
    assert timeless_records(stopped) == timeless_records(runs.ddp)


@needs_gloo
def test_a_run_resumed_with_another_number_of_processes_ends_close_to_the_uninterrupted_one(runs, tmp_path):
    # docs/concepts.md: from the resume on it sums in another order, so it agrees within float tolerance only
    sets = ["run.checkpoint_every_n_steps=3"]
    stopped = run_stopped(load_recipe(runs.root / "recipe.toml", sets), tmp_path / "stopped", "train", 8)
    assert load_checkpoint(stopped / "checkpoints" / "last.pt")["step"] > 0  # resumed mid-stage, not started over
    resume_run(runs.root / "recipe.toml", stopped, sets, processes=2)
    assert json.loads((stopped / "env.json").read_text())["processes"] == 1  # started in one process
    assert_close(summary(stopped)["metrics"], summary(runs.single)["metrics"], "final metrics")


class _Windows(torch.utils.data.Dataset):
    """``n`` one-token examples: the batch split without a real corpus."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input": torch.tensor([i])}


def _rank_state(n: int, batch_size: int, rank: int, world: int) -> SimpleNamespace:
    """The parts of a State that iterate_batches and count_batches read, for one rank."""
    data = SimpleNamespace(batch_size=batch_size, eval_batch_size=None, shuffle=True, drop_last=False,
                           num_workers=0)
    return SimpleNamespace(recipe=SimpleNamespace(data=data), data={"train": _Windows(n)}, seed=0,
                           stage_index=0, dist=DistInfo(rank, world, rank), device=torch.device("cpu"))


def _steps_per_rank(n: int, batch_size: int = 8, world: int = 2) -> list[tuple[int, int]]:
    """(batches drawn, batches planned) of each rank for a training split of ``n`` examples."""
    return [(len(list(iterate_batches(_rank_state(n, batch_size, rank, world), "train", train=True))),
             count_batches(_rank_state(n, batch_size, rank, world), "train", train=True))
            for rank in range(world)]


@pytest.mark.parametrize("n", [16, 15, 10])
def test_every_rank_takes_the_same_number_of_training_steps(n):
    assert set(_steps_per_rank(n)) == {(2, 2)}


def test_a_last_batch_smaller_than_the_world_does_not_split_the_ranks():
    steps = _steps_per_rank(17)  # 8 + 8 + 1: rank 1 has no share of the last batch
    assert len(set(steps)) == 1 and steps[0][0] == steps[0][1]


def test_an_evaluation_counts_a_last_batch_smaller_than_the_world_on_the_main_process():
    # 8 + 8 + 1: rank 0 evaluates the last example, rank 1 has no share of it (training drops it)
    state = _rank_state(17, 8, 0, 2)
    assert len(list(iterate_batches(state, "train", train=False))) == count_batches(state, "train", train=False) == 3


def test_unsharded_batches_give_every_rank_the_whole_split_in_order():
    def inputs(rank: int, shard: bool) -> list[int]:
        state = _rank_state(13, 4, rank, 2)
        return [int(i) for b in iterate_batches(state, "train", train=False, shard=shard) for i in b["input"]]

    assert inputs(0, shard=False) == inputs(1, shard=False) == list(range(13))
    assert sorted(inputs(0, shard=True) + inputs(1, shard=True)) == list(range(13))  # each rank a share
    assert inputs(1, shard=True) == [1, 3, 5, 7, 9, 11]


UNEVEN = RECIPE.replace("batch_size = 8 ", "batch_size = 7 ").replace("drop_last = true ", "drop_last = false ") + """\
losses = [{ use = "stagewise.cross_entropy" },
          { use = "stagewise.cross_entropy", name = "late", start_epoch = 1, fallback_threshold = 5.5 }]
"""


@pytest.fixture(scope="module")
def uneven(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Global batches of 7 (4 + 3 per rank), and a term with weight 0 in epoch 0."""
    return single_and_ddp(tmp_path_factory.mktemp("uneven"), UNEVEN)


@needs_gloo
def test_term_metrics_weigh_ranks_by_their_share_of_an_uneven_batch(uneven):
    def epochs(run_dir: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in records(run_dir) if r["event"] == "epoch"]

    single, ddp = epochs(uneven.single), epochs(uneven.ddp)
    assert "train/late" not in single[0] and "train/late" in single[1]  # inactive, then active
    assert single[1]["train/late/fallbacks"] > 0  # the fallback is decided on the global batch's value
    for i, (got, want) in enumerate(zip(ddp, single, strict=True)):
        assert_close(got, want, f"epoch {i}")


# 41 training windows in global batches of 7 (4 + 3 per rank), the last of 6 (3 + 3); 4 batches a step: an
# epoch's second step accumulates a batch of 7 and one of 6, each weighted by its examples
ACCUMULATED = UNEVEN.replace("max_tokens = 2000 ", "max_tokens = 375 ").replace("max_steps_per_epoch = 6",
                                                                               "accumulate_batches = 4")


# `python no_sync.py ARGS`: the stagewise CLI, each process adding a line to no_sync.RANK as it enters DDP's no_sync()
NO_SYNC_COUNTER = """\
import os
import sys

from torch.nn.parallel import DistributedDataParallel

from stagewise.cli.main import main

no_sync = DistributedDataParallel.no_sync


def counted(self):
    with open(f"no_sync.{os.environ['RANK']}", "a") as file:
        file.write("entered\\n")
    return no_sync(self)


DistributedDataParallel.no_sync = counted
sys.exit(main(sys.argv[1:]))
"""


@needs_gloo
def test_accumulated_batches_end_close_to_the_single_process_run(tmp_path):
    assert "accumulate_batches = 4" in ACCUMULATED and "max_tokens = 375" in ACCUMULATED
    (tmp_path / "recipe.toml").write_text(ACCUMULATED)
    (tmp_path / "no_sync.py").write_text(NO_SYNC_COUNTER)
    run_python(["-m", "stagewise", "run", "recipe.toml", "--out", "single", "--quiet"], tmp_path)
    run_python(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "no_sync.py", "run", "recipe.toml",
                "--out", "ddp", "--quiet"], tmp_path)
    # all but a step's last batch keep their gradients local: 3 + 1 an epoch, on every rank
    assert [len((tmp_path / f"no_sync.{rank}").read_text().splitlines()) for rank in (0, 1)] == [8, 8]
    single, ddp = records(tmp_path / "single"), records(tmp_path / "ddp")
    assert [r["step"] for r in single if r["event"] == "step"] == [1, 2, 3, 4]  # 2 optimizer steps an epoch
    assert [(r["event"], r["step"]) for r in ddp] == [(r["event"], r["step"]) for r in single]
    for got, want in zip(ddp, single, strict=True):
        assert_close({k: v for k, v in got.items() if k != "seconds"},
                     {k: v for k, v in want.items() if k != "seconds"}, f"{want['event']} record, step {want['step']}")


@needs_gloo
def test_a_split_with_fewer_examples_than_processes_evaluates_as_in_one_process(tmp_path):
    # was: the process with no batch of the one-window validation split summed no metric, so the ranks'
    # all-reduces differed in length and the job crashed at the first validation
    words = [f"w{i}" for i in range(30)]
    (tmp_path / "data").mkdir()
    for split, lines in (("train", 60), ("valid", 0), ("test", 5)):
        text = "\n".join(" ".join(words[(7 * i + j) % 30] for j in range(12)) for i in range(lines))
        (tmp_path / "data" / f"{split}.txt").write_text(text or " ".join(words[:10]))  # valid: 1 window of 9
    runs = single_and_ddp(tmp_path, RECIPE.replace("max_tokens = 2000", 'path = "data"  #'))
    single, ddp = summary(runs.single)["metrics"], summary(runs.ddp)["metrics"]
    assert single["val/loss"] > 0
    assert_close(ddp, single, "final metrics")
