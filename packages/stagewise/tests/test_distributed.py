"""Data-parallel training under torchrun: 2 CPU processes (gloo) end with the numbers of one.

The same tiny recipe runs once in a single process and once as
``torchrun --standalone --nproc_per_node=2 -m stagewise run``. ``[data] batch_size`` is the
global batch: each rank trains on half of every global batch and DDP averages the gradients,
so the two runs take the same optimizer steps and their final metrics agree up to the order
of float sums. Only rank 0 writes the run directory. Without torchrun, the batch split itself
is checked: every rank must take the same number of training steps, or DDP's all-reduce hangs.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

import stagewise
from stagewise.engine.batches import count_batches, iterate_batches
from stagewise.engine.checkpoint import load_checkpoint
from stagewise.engine.distributed import DistInfo, collective_device, setup
from stagewise.plots import have_matplotlib
from stagewise.recipe import load_recipe
from stagewise.testing import (
    resume_run,
    run_child,
    run_killed,
    run_stopped,
    run_terminated,
    run_uninterrupted,
    timeless_records,
)

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


def _environment() -> dict[str, str]:
    """This environment without any torchrun variables (pytest itself may run under one)."""
    launcher = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"}
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _child(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``python ARGS`` in ``cwd``; past TIMEOUT_S it is stopped with every process it started (torchrun's workers)."""
    return run_child([sys.executable, *args], timeout=TIMEOUT_S, cwd=cwd, env=_environment())


def _run(args: list[str], cwd: Path) -> None:
    done = _child(args, cwd)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The recipe run single-process (``single/``) and by 2 gloo processes (``ddp/``)."""
    return _single_and_ddp(tmp_path_factory.mktemp("distributed"), RECIPE)


def _single_and_ddp(root: Path, recipe: str) -> SimpleNamespace:
    (root / "recipe.toml").write_text(recipe)
    _run(["-m", "stagewise", "run", "recipe.toml", "--out", "single", "--quiet"], root)
    _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
          "-m", "stagewise", "run", "recipe.toml", "--out", "ddp", "--quiet"], root)
    return SimpleNamespace(root=root, single=root / "single", ddp=root / "ddp")


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_close(actual: dict, expected: dict, where: str) -> None:
    assert actual.keys() == expected.keys(), where
    for key, want in expected.items():
        got = actual[key]
        if isinstance(want, float):
            assert math.isclose(got, want, rel_tol=REL_TOL), f"{where} {key}: {got} != {want}"
        else:
            assert got == want, f"{where} {key}: {got!r} != {want!r}"


@needs_gloo
def test_two_processes_end_with_the_single_process_metrics(runs):
    single, ddp = _summary(runs.single), _summary(runs.ddp)
    assert single["metrics"]["train/best_epoch"] == 1  # the runs trained: validation improved
    _assert_close(ddp["metrics"], single["metrics"], "final metrics")
    for name, stage in single["stages"].items():
        assert ddp["stages"][name]["epochs"] == stage["epochs"]
        _assert_close(ddp["stages"][name]["metrics"], stage["metrics"], f"stage {name}")


@needs_gloo
def test_every_epoch_matches_the_single_process_run(runs):
    def epochs(run_dir: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in _records(run_dir) if r["event"] == "epoch"]

    single, ddp = epochs(runs.single), epochs(runs.ddp)
    assert len(single) == len(ddp) == 2
    for i, (got, want) in enumerate(zip(ddp, single, strict=True)):
        _assert_close(got, want, f"epoch {i}")


@needs_gloo
def test_only_rank_zero_writes(runs):
    assert sorted(p.name for p in runs.root.iterdir()) == ["ddp", "recipe.toml", "single"]
    assert sorted(p.name for p in runs.ddp.iterdir()) == sorted(p.name for p in runs.single.iterdir())
    assert sorted(p.name for p in (runs.ddp / "checkpoints").iterdir()) == ["last.pt", "train.pt"]
    assert [json.loads((run / "env.json").read_text())["processes"] for run in (runs.single, runs.ddp)] == [1, 2]
    ddp, single = _records(runs.ddp), _records(runs.single)
    keys = [(r["event"], r["stage"], r["epoch"], r["step"]) for r in ddp]
    assert len(keys) == len(set(keys)), "a record was written twice (by more than one rank)"
    assert keys == [(r["event"], r["stage"], r["epoch"], r["step"]) for r in single]


@needs_gloo
def test_step_records_hold_the_global_batch_loss(runs):
    single = [r["train/loss"] for r in _records(runs.single) if r["event"] == "step"]
    ddp = [r["train/loss"] for r in _records(runs.ddp) if r["event"] == "step"]
    assert len(ddp) == len(single) == 12
    for step, (got, want) in enumerate(zip(ddp, single, strict=True), start=1):
        assert math.isclose(got, want, rel_tol=REL_TOL), f"step {step}: {got} != {want}"


@needs_gloo
def test_a_killed_torchrun_job_resumed_under_torchrun_ends_with_the_uninterrupted_numbers(runs, tmp_path):
    sets = ["run.checkpoint_every_n_steps=3"]  # last checkpoint before the kill: epoch 1, after step 6
    run_killed(runs.root / "recipe.toml", tmp_path / "killed", "train", 8, sets, processes=2)
    assert load_checkpoint(tmp_path / "killed" / "checkpoints" / "last.pt")["step"] == 6
    resume_run(runs.root / "recipe.toml", tmp_path / "killed", sets, processes=2)
    assert _summary(tmp_path / "killed")["metrics"] == _summary(runs.ddp)["metrics"]  # bit-identical
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
    assert _summary(stopped)["metrics"] == _summary(runs.ddp)["metrics"]  # bit-identical
    assert timeless_records(stopped) == timeless_records(runs.ddp)


@needs_gloo
def test_a_run_resumed_with_another_number_of_processes_ends_close_to_the_uninterrupted_one(runs, tmp_path):
    # docs/concepts.md: from the resume on it sums in another order, so it agrees within float tolerance only
    sets = ["run.checkpoint_every_n_steps=3"]
    stopped = run_stopped(load_recipe(runs.root / "recipe.toml", sets), tmp_path / "stopped", "train", 8)
    assert load_checkpoint(stopped / "checkpoints" / "last.pt")["step"] > 0  # resumed mid-stage, not started over
    resume_run(runs.root / "recipe.toml", stopped, sets, processes=2)
    assert json.loads((stopped / "env.json").read_text())["processes"] == 1  # started in one process
    _assert_close(_summary(stopped)["metrics"], _summary(runs.single)["metrics"], "final metrics")


# `torchrun ... sleeper.py`: each worker says its pid, then waits as one does for a collective another never joins
SLEEPER = """\
import os
import time
from pathlib import Path

Path(f"worker{os.environ['RANK']}.pid").write_text(str(os.getpid()))
time.sleep(3600)
"""


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads which processes run from /proc (Linux)")
def test_a_torchrun_job_stopped_at_its_timeout_leaves_no_worker_behind(tmp_path):
    # was: the timeout of subprocess.run killed torchrun alone, and its workers, each in a session (so a process
    # group) of its own, slept on after the test; with the tests' jobs, waiting on each other for good
    (tmp_path / "sleeper.py").write_text(SLEEPER)
    with pytest.raises(subprocess.TimeoutExpired):
        run_child([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "sleeper.py"],
                  timeout=15, cwd=tmp_path, env=_environment())
    said = [tmp_path / f"worker{rank}.pid" for rank in (0, 1)]
    assert all(path.exists() for path in said), "torchrun had started no worker by the timeout: raise it"
    assert [int(path.read_text()) for path in said if _running(int(path.read_text()))] == []


# `python starter.py`: starts a process in a session of its own, as torchrun starts a worker; both say their pids
STARTER = """\
import os
import subprocess
import sys
import time
from pathlib import Path

sleeper = "import os, time; open('started.pid', 'w').write(str(os.getpid())); time.sleep(3600)"
subprocess.Popen([sys.executable, "-c", sleeper], start_new_session=True)
Path("starter.pid").write_text(str(os.getpid()))
time.sleep(3600)
"""


@pytest.fixture
def ctrl_c_interrupts():
    """SIGINT raises KeyboardInterrupt during the test, as Ctrl-C does in a terminal: a script's background job
    (`pytest ... &`, as test runs started side by side are) starts with SIGINT ignored, which Python keeps, and
    the test's Ctrl-C was lost (run_child ran to its timeout)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads which processes run from /proc (Linux)")
def test_a_child_stopped_by_ctrl_c_is_killed_with_what_it_started(tmp_path, ctrl_c_interrupts):
    # run_child starts its child in a session of its own, which the terminal's Ctrl-C does not reach: it kills it
    (tmp_path / "starter.py").write_text(STARTER)
    pids = [tmp_path / "starter.pid", tmp_path / "started.pid"]

    def interrupt_once_started() -> None:
        deadline = time.monotonic() + 30
        while not all(pid.is_file() and pid.read_text() for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # Ctrl-C

    threading.Thread(target=interrupt_once_started, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        run_child([sys.executable, "starter.py"], timeout=60, cwd=tmp_path)
    assert [int(pid.read_text()) for pid in pids if _running(int(pid.read_text()))] == []


def _running(pid: int) -> bool:
    """Whether process ``pid`` still runs 5 s on (a killed one is gone, or a zombie until its new parent reaps it)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except FileNotFoundError:
            return False
        if state == "Z":
            return False
        time.sleep(0.1)
    return True


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
    return _single_and_ddp(tmp_path_factory.mktemp("uneven"), UNEVEN)


@needs_gloo
def test_term_metrics_weigh_ranks_by_their_share_of_an_uneven_batch(uneven):
    def epochs(run_dir: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in _records(run_dir) if r["event"] == "epoch"]

    single, ddp = epochs(uneven.single), epochs(uneven.ddp)
    assert "train/late" not in single[0] and "train/late" in single[1]  # inactive, then active
    assert single[1]["train/late/fallbacks"] > 0  # the fallback is decided on the global batch's value
    for i, (got, want) in enumerate(zip(ddp, single, strict=True)):
        _assert_close(got, want, f"epoch {i}")



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
    _run(["-m", "stagewise", "run", "recipe.toml", "--out", "single", "--quiet"], tmp_path)
    _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "no_sync.py", "run", "recipe.toml",
          "--out", "ddp", "--quiet"], tmp_path)
    # all but a step's last batch keep their gradients local: 3 + 1 an epoch, on every rank
    assert [len((tmp_path / f"no_sync.{rank}").read_text().splitlines()) for rank in (0, 1)] == [8, 8]
    single, ddp = _records(tmp_path / "single"), _records(tmp_path / "ddp")
    assert [r["step"] for r in single if r["event"] == "step"] == [1, 2, 3, 4]  # 2 optimizer steps an epoch
    assert [(r["event"], r["step"]) for r in ddp] == [(r["event"], r["step"]) for r in single]
    for got, want in zip(ddp, single, strict=True):
        _assert_close({k: v for k, v in got.items() if k != "seconds"},
                      {k: v for k, v in want.items() if k != "seconds"}, f"{want['event']} record, step {want['step']}")


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

NOT_YET = '''\
class NotYet(stagewise.Loss):
    """NaN in value and gradient: an auxiliary term that is not switched on yet."""

    name = "ddptest.not_yet"

    def forward(self, outputs, batch, state):
        return torch.sqrt(-1.0 - outputs["logits"].pow(2).mean())
'''

WITH_PARAMETER = '''\
class Scaled(stagewise.Loss):
    """A term with a parameter of its own, as a Koopman operator or a probe has."""

    name = "ddptest.scaled"

    def setup(self, state):
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, outputs, batch, state):
        return (self.scale * outputs["logits"].mean()).square()
'''


def _launcher(loss: str, cls: str) -> str:
    return LAUNCHER.replace("LOSS", loss).replace("CLASS", cls)

VARYING = '''\
class Varying(stagewise.Loss):
    """A part that only some shares of a batch give (here rank 0's), as a part that needs some kind of example."""

    name = "ddptest.varying"

    def forward(self, outputs, batch, state):
        mean = outputs["logits"].mean()
        return {"square": mean.square(), **({"abs": mean.abs()} if state.dist.rank == 0 else {})}
'''


NOT_YET_GRADIENT = '''\
class NotYetGradient(stagewise.Loss):
    """A finite value (0) whose gradient is not (a square root at 0): an auxiliary term not switched on yet."""

    name = "ddptest.not_yet_gradient"

    def forward(self, outputs, batch, state):
        logits = outputs["logits"]
        return (logits - logits.detach()).pow(2).mean().sqrt()
'''

HUGE = '''\
class Huge(stagewise.Loss):
    """Infinite: a term whose fallback cuts it to weight 0."""

    name = "ddptest.huge"

    def forward(self, outputs, batch, state):
        return torch.exp(outputs["logits"].abs().max() * 1e4)
'''


@needs_gloo
@pytest.mark.parametrize(("loss", "cls", "term"), [
    (NOT_YET, "NotYet", 'use = "ddptest.not_yet", start_epoch = 5'),
    (NOT_YET_GRADIENT, "NotYetGradient", 'use = "ddptest.not_yet_gradient", start_epoch = 5'),
    (HUGE, "Huge", 'use = "ddptest.huge", weight = 0.1, fallback_threshold = 1e6, fallback_factor = 0.0'),
], ids=["value", "gradient", "cut"])
def test_a_term_of_weight_0_that_is_not_finite_trains_under_ddp_as_in_one_process(tmp_path, loss, cls, term):
    # was: DDP put every term in the graph, one of weight 0 as 0 · NaN, so every batch was skipped (and
    # max_nonfinite stopped a longer job) where one process, which leaves the term out, trains on; and a NaN
    # gradient (0 · inf) reached every weight at the first step, whose next loss was then NaN
    (tmp_path / "launch.py").write_text(_launcher(loss, cls))
    (tmp_path / "recipe.toml").write_text(RECIPE + f'losses = [{{ use = "stagewise.cross_entropy" }}, {{ {term} }}]\n')
    _run(["launch.py", "run", "recipe.toml", "--out", "single", "--quiet"], tmp_path)
    _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
          "launch.py", "run", "recipe.toml", "--out", "ddp", "--quiet"], tmp_path)
    single, ddp = _summary(tmp_path / "single")["metrics"], _summary(tmp_path / "ddp")["metrics"]
    assert ddp["train/nonfinite"] == single["train/nonfinite"] == 0
    _assert_close(ddp, single, "final metrics")


@needs_gloo
def test_a_term_whose_parts_differ_between_processes_stops_the_job_with_an_error(tmp_path):
    # was: the ranks' all-reduces of the terms' values and parts differed in length, and the job hung
    (tmp_path / "launch.py").write_text(_launcher(VARYING, "Varying"))
    (tmp_path / "recipe.toml").write_text(RECIPE.replace("max_epochs = 2", "max_epochs = 1") + (
        'losses = [{ use = "stagewise.cross_entropy" }, { use = "ddptest.varying", name = "aux", weight = 0.1 }]\n'))
    done = _child(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                   "launch.py", "run", "recipe.toml", "--out", "ddp", "--quiet"], tmp_path)
    assert done.returncode != 0
    assert "stage 'train' epoch 0 batch 0: under torchrun the loss terms returned other parts" in done.stderr
    assert "'aux' (ddptest.varying): square, abs" in done.stderr, done.stderr


@needs_gloo
def test_a_switched_off_term_s_parameters_stay_untouched_under_ddp(tmp_path):
    # was: DDP gave them zero gradients (the term is in the graph at weight 0), and AdamW then
    # decayed them every step; in one process a term not switched on yet is not computed at all
    (tmp_path / "launch.py").write_text(_launcher(WITH_PARAMETER, "Scaled"))
    (tmp_path / "recipe.toml").write_text(RECIPE.replace("max_epochs = 2", "max_epochs = 1") + (
        'weight_decay = 0.5\nlosses = [{ use = "stagewise.cross_entropy" }, { use = "ddptest.scaled", '
        'start_epoch = 5 }]\n'))
    _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
          "launch.py", "run", "recipe.toml", "--out", "ddp", "--quiet"], tmp_path)
    assert torch.load(tmp_path / "term.pt", weights_only=True)["scale"].item() == 1.0


# No test here runs NCCL (no GPUs): these check that a CUDA job puts its collectives where NCCL needs them.
def test_nccl_collectives_run_on_the_process_gpu(monkeypatch):
    """NCCL reduces CUDA tensors only: all_reduce_sums' tensor goes to this process's GPU."""
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert collective_device() == torch.device("cuda", 1)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert collective_device() == torch.device("cpu")


def test_a_cuda_process_takes_its_gpu_before_joining_the_group(monkeypatch):
    """Else NCCL's barrier and sums run on GPU 0 in every process."""
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(dist, "init_process_group", lambda backend: calls.append(("init", backend)))
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    assert setup(torch.device("cuda", 1)) == DistInfo(1, 2, 1)
    assert calls == [("set_device", torch.device("cuda", 1)), ("init", "nccl")]


def test_no_process_leaves_before_the_run_directory_is_written(tiny, tmp_path, monkeypatch):
    """A rank that left first (and crashed in torch's teardown) got rank 0 stopped before its summary."""
    from stagewise.engine import distributed, runner

    summary, written = tmp_path / "run" / "summary.json", []
    monkeypatch.setattr(distributed, "barrier", lambda info: written.append(summary.exists()))
    runner.run_recipe(tiny(), out=tmp_path / "run", quiet=True)
    assert written[-1] and not any(written[:-1])  # the checkpoints' barriers, then one after the summary


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return _child(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "stagewise", *args], cwd)


@needs_gloo
def test_a_split_with_fewer_examples_than_processes_evaluates_as_in_one_process(tmp_path):
    # was: the process with no batch of the one-window validation split summed no metric, so the ranks'
    # all-reduces differed in length and the job crashed at the first validation
    words = [f"w{i}" for i in range(30)]
    (tmp_path / "data").mkdir()
    for split, lines in (("train", 60), ("valid", 0), ("test", 5)):
        text = "\n".join(" ".join(words[(7 * i + j) % 30] for j in range(12)) for i in range(lines))
        (tmp_path / "data" / f"{split}.txt").write_text(text or " ".join(words[:10]))  # valid: 1 window of 9
    runs = _single_and_ddp(tmp_path, RECIPE.replace("max_tokens = 2000", 'path = "data"  #'))
    single, ddp = _summary(runs.single)["metrics"], _summary(runs.ddp)["metrics"]
    assert single["val/loss"] > 0
    _assert_close(ddp, single, "final metrics")


@needs_gloo
def test_a_bad_recipe_under_torchrun_is_said_once_and_writes_nothing(tmp_path):
    # was: each process printed the same recipe error, once per process
    (tmp_path / "recipe.toml").write_text(RECIPE)
    done = _torchrun(["run", "recipe.toml", "--set", "stages.train.lr=-1", "--out", "ddp"], tmp_path)
    assert done.returncode != 0
    assert done.stderr.count("stagewise: error: recipe.toml: 1 problem:\n  - stages.train.lr") == 1, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.toml"]


# `python late_rank_0.py ARGS`: the stagewise CLI, rank 0 starting 3 s after the others, as on a loaded machine
LATE_RANK_0 = """\
import os
import sys
import time

from stagewise.cli.main import main

if os.environ["RANK"] == "0":
    time.sleep(3)
sys.exit(main(sys.argv[1:]))
"""


@needs_gloo
def test_a_bad_recipe_is_said_when_rank_0_is_behind(tmp_path):
    # was: rank 0 alone said a recipe's errors, but process 1 met it first and ended, and torchrun stopped rank 0
    # before it could: the job failed without a word of why
    (tmp_path / "recipe.toml").write_text(RECIPE)
    (tmp_path / "late_rank_0.py").write_text(LATE_RANK_0)
    done = _child(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "late_rank_0.py", "run",
                   "recipe.toml", "--set", "stages.train.lr=-1", "--out", "ddp"], tmp_path)
    assert done.returncode != 0
    assert done.stderr.count("stagewise: error: recipe.toml: 1 problem:\n  - stages.train.lr") == 1, done.stderr


ONE_SHARE = '''\
class OneShare(stagewise.Loss):
    """A check on the examples of this process's share of a batch: process 1's fail it."""

    name = "ddptest.one_share"

    def forward(self, outputs, batch, state):
        if state.dist.rank == 1:
            raise stagewise.ConfigError(["an example of this batch is out of range"])
        return outputs["logits"].mean()
'''


@needs_gloo
def test_an_error_in_one_process_s_run_is_said_once_and_ends_the_job(tmp_path):
    # was: process 1 left its recipe error for rank 0 to say, which never met it: the job failed without a word of
    # why, but for rank 0's traceback of its broken-off collective ('Connection closed by peer')
    (tmp_path / "launch.py").write_text(_launcher(ONE_SHARE, "OneShare"))
    (tmp_path / "recipe.toml").write_text(RECIPE + (
        'losses = [{ use = "stagewise.cross_entropy" }, { use = "ddptest.one_share", weight = 0.1 }]\n'))
    done = _child(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                   "launch.py", "run", "recipe.toml", "--out", "ddp", "--quiet"], tmp_path)
    assert done.returncode != 0
    said = "stagewise: error: recipe.toml: 1 problem:\n  - stages.train.losses.one_share: an example of this batch is"
    assert done.stderr.count(said) == 1, done.stderr
    assert not re.search(r"\[rank\d\]: Traceback", done.stderr), done.stderr


# `python in_the_way.py ARGS`: the stagewise CLI, rank 0's checkpoints folder turned into a file after step 2, so
# that its next checkpoint fails as a full disk would: the file system refusing core, on rank 0 alone
IN_THE_WAY = """\
import shutil
import sys

import stagewise
from stagewise.cli.main import main
from stagewise.plugins import register_plugin


class InTheWay:
    @stagewise.hookimpl
    def stagewise_after_step(self, state):
        if state.dist.rank == 0 and state.step == 2:
            shutil.rmtree(state.run_dir.checkpoints)
            state.run_dir.checkpoints.write_text("in the way")


register_plugin(InTheWay(), "in_the_way")
sys.exit(main(sys.argv[1:]))
"""


@needs_gloo
def test_a_file_system_error_of_one_process_is_said_once_and_ends_the_job(tmp_path):
    # was: rank 0 said it, but did not mark the job failed, so process 1, whose collective broke off as rank 0
    # ended, printed its traceback ('Connection reset by peer', "in stage 'train'")
    (tmp_path / "recipe.toml").write_text(RECIPE.replace("[run]\n", "[run]\ncheckpoint_every_n_steps = 4\n"))
    (tmp_path / "in_the_way.py").write_text(IN_THE_WAY)
    done = _child(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "in_the_way.py", "run",
                   "recipe.toml", "--out", "ddp", "--quiet"], tmp_path)
    assert done.returncode != 0
    assert done.stderr.count(f"stagewise: error: {Path('ddp', 'checkpoints')}: ") == 1, done.stderr
    assert not re.search(r"\[rank\d\]: Traceback", done.stderr), done.stderr


@needs_gloo
def test_an_error_every_process_meets_in_its_run_is_said_once(tmp_path):
    # was: every process said it (a training error was not left to rank 0, as it may be one process's alone)
    (tmp_path / "recipe.toml").write_text(RECIPE.replace("grad_clip = 1.0\n", ""))
    done = _torchrun(["run", "recipe.toml", "--out", "ddp", "--quiet", "--set", "stages.train.optimizer='sgd'",
                      "--set", "stages.train.lr=1e29"], tmp_path)  # diverges at the first step
    assert done.returncode != 0
    assert done.stderr.count("stagewise: error: non-finite loss (nan) at stage 'train'") == 1, done.stderr


@needs_gloo
def test_compare_under_torchrun_prints_its_table_once(tmp_path):
    # was: every process printed the table and wrote compare.json
    (tmp_path / "a.toml").write_text(RECIPE.replace("max_epochs = 2", "max_epochs = 1"))
    (tmp_path / "b.toml").write_text(RECIPE.replace("max_epochs = 2", "max_epochs = 1").replace('"ddp"', '"other"'))
    done = _torchrun(["compare", "a.toml", "b.toml", "--quiet", "--out", "cmp"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("-> cmp/compare.json") == 1, done.stdout
    assert done.stdout.count("-> cmp/compare.png") == have_matplotlib(), done.stdout
    figure = ["compare.png"] if have_matplotlib() else []  # drawn once too
    assert sorted(p.name for p in (tmp_path / "cmp").iterdir()) == ["compare.json", *figure, "ddp", "other"]


@pytest.mark.parametrize("command", ["run", "compare"])
def test_a_torchrun_job_s_resume_command_is_a_torchrun_command(monkeypatch, command):
    # was: `stagewise run ... --resume RUN`, which resumed a 2-process job in one process (other float sums)
    from stagewise.cli.commands import _resume_command

    args = SimpleNamespace(command=command, overrides=["run.seed=1"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert _resume_command(args, ["r.toml"], Path("runs/r")) == (
        f"torchrun --nproc_per_node=2 -m stagewise {command} r.toml --resume runs/r --set run.seed=1")
    monkeypatch.setenv("WORLD_SIZE", "4")  # two machines of 2: their rendezvous options are the user's
    assert _resume_command(args, ["r.toml"], Path("runs/r")).startswith("torchrun --nnodes=2 --nproc_per_node=2 -m ")
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert _resume_command(args, ["r.toml"], Path("runs/r")).startswith(f"stagewise {command} r.toml")


LATE_RANK = """\
import os, sys, time
from pathlib import Path
from stagewise.engine import runner
from stagewise.recipe import load_recipe

# rank 1 picks its folder after rank 0 has made runs/ddp, or 2 s after rank 0 picked its own (if rank 0 waits)
pick = runner._run_folder
def after_rank_0(*args):
    deadline = time.monotonic() + 60  # rank 0 crashed before picking: the job fails, rank 1 does not hang
    while not Path("rank0_picked").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    deadline = time.monotonic() + 2
    while not Path("runs/ddp/recipe.toml").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return pick(*args)
def rank_0(*args):
    folder = pick(*args)
    Path("rank0_picked").touch()
    return folder
runner._run_folder = rank_0 if os.environ["RANK"] == "0" else after_rank_0
Path(f"rank{os.environ['RANK']}.txt").write_text(str(runner.run_recipe(load_recipe("recipe.toml"), quiet=True)))
"""


@needs_gloo
def test_every_process_of_a_job_writes_to_the_folder_rank_zero_chose(tmp_path):
    # was: each process numbered the default folder past the ones in use by itself, so a process that looked after
    # rank 0 had made runs/ddp took runs/ddp-2 (its Ctrl-C then named no run to resume)
    (tmp_path / "recipe.toml").write_text(RECIPE.replace("max_epochs = 2", "max_epochs = 1"))
    (tmp_path / "late_rank.py").write_text(LATE_RANK)
    done = _child(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "late_rank.py"], tmp_path)
    assert done.returncode == 0, done.stderr
    # a file per process: their prints, through torchrun's one pipe, could interleave
    assert [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)] == ["runs/ddp", "runs/ddp"]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["ddp"]


# an installed plugin (a dist-info folder on PYTHONPATH), so that stagewise.testing's children load it:
# a term with a parameter, a mean over examples (so 2 processes compute what one does), and each rank's
# weights (the model's and the terms') after each stage
TERM_PLUGIN = '''\
import os

import torch

import stagewise


class Scaled(stagewise.Loss):
    name = "ddptest.scaled"

    def setup(self, state):
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, outputs, batch, state):
        return (self.scale * outputs["logits"].mean(-1)).square().mean()


@stagewise.hookimpl
def stagewise_register_losses(register):
    register(Scaled)


@stagewise.hookimpl
def stagewise_after_stage(state):
    weights = {**state.model.state_dict(), **{f"{n}.{k}": v for n, t in state.terms.items()
                                              for k, v in t.state_dict().items()}}
    torch.save(weights, os.path.join(os.environ["DDPTEST_WEIGHTS"], f"rank{state.dist.rank}.pt"))
'''

# the scaled term in 3 ways: off in epoch 0 ("late", "ramped": weight 0.5 in epoch 1), and cut to weight 0 at
# every batch by its fallback ("cut"); weight decay, so that a zero gradient would move a parameter
LATE_TERMS = RECIPE + """\
weight_decay = 0.5
losses = [{ use = "stagewise.cross_entropy" },
          { use = "ddptest.scaled", name = "late", start_epoch = 1 },
          { use = "ddptest.scaled", name = "ramped", start_epoch = 1, ramp_epochs = 2 },
          { use = "ddptest.scaled", name = "cut", fallback_threshold = 0.0, fallback_factor = 0.0 }]
"""
KILLED_IN_EPOCH_0 = ["run.checkpoint_every_n_steps=3"]  # killed after step 4: resumed from step 3, terms off


@pytest.fixture(scope="module")
def late_terms(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """LATE_TERMS run in one process (``single``), by 2 (``ddp``), and by 2 killed in epoch 0 and resumed
    (``resumed``); each run's folder also holds its ranks' final weights (``rank0.pt``, ...)."""
    root = tmp_path_factory.mktemp("late_terms")
    site = root / "site"
    info = site / "ddptest-0.0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ddptest\nVersion: 0.0.1\n")
    (info / "entry_points.txt").write_text("[stagewise]\nddptest = ddptest\n")
    (site / "ddptest.py").write_text(TERM_PLUGIN)
    recipe = root / "recipe.toml"
    recipe.write_text(LATE_TERMS)
    runs = SimpleNamespace(**{name: root / name for name in ("single", "ddp", "resumed")})
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p))
        env.setenv("STAGEWISE_LOAD_PLUGINS", "ddptest")
        for name, processes in (("single", 1), ("ddp", 2)):
            getattr(runs, name).mkdir()
            env.setenv("DDPTEST_WEIGHTS", str(getattr(runs, name)))
            run_uninterrupted(recipe, getattr(runs, name), KILLED_IN_EPOCH_0, processes=processes)
        env.setenv("DDPTEST_WEIGHTS", str(runs.resumed))
        run_killed(recipe, runs.resumed, "train", 4, KILLED_IN_EPOCH_0, processes=2)
        runs.checkpoint = load_checkpoint(runs.resumed / "checkpoints" / "last.pt")
        resume_run(recipe, runs.resumed, KILLED_IN_EPOCH_0, processes=2)
    return runs


def _weights(run_dir: Path, rank: int = 0) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / f"rank{rank}.pt", weights_only=True)


@needs_gloo
def test_terms_switched_on_later_train_alike_on_every_rank_and_as_in_one_process(late_terms):
    single = _records(late_terms.single)
    epochs = [r for r in single if r["event"] == "epoch"]
    assert ["train/late" in r for r in epochs] == [False, True] and epochs[1]["train/ramped/weight"] == 0.5
    assert epochs[0]["train/cut/weight"] == 0.0 and epochs[0]["train/cut/fallbacks"] == 6  # cut at every batch
    ddp = _weights(late_terms.ddp)
    for name, tensor in _weights(late_terms.ddp, rank=1).items():
        assert torch.equal(tensor, ddp[name]), f"{name}: the ranks drifted apart"
    for name, tensor in _weights(late_terms.single).items():
        assert torch.allclose(ddp[name], tensor, rtol=REL_TOL, atol=1e-6), f"{name}: not the one process's"
    assert ddp["cut.scale"].item() == 1.0  # it never took part in a step: untouched, as in one process
    assert ddp["late.scale"].item() != 1.0 and ddp["ramped.scale"].item() != 1.0  # trained in epoch 1
    _assert_close(_summary(late_terms.ddp)["metrics"], _summary(late_terms.single)["metrics"], "final metrics")


@needs_gloo
def test_a_torchrun_job_killed_while_terms_are_off_resumes_to_the_uninterrupted_numbers(late_terms):
    assert (late_terms.checkpoint["loop"]["epoch"], late_terms.checkpoint["step"]) == (0, 3)
    assert _summary(late_terms.resumed)["metrics"] == _summary(late_terms.ddp)["metrics"]  # bit-identical
    assert timeless_records(late_terms.resumed) == timeless_records(late_terms.ddp)
    resumed, ddp = _weights(late_terms.resumed), _weights(late_terms.ddp)
    assert resumed.keys() == ddp.keys() and all(torch.equal(resumed[k], ddp[k]) for k in ddp)


@needs_gloo
@pytest.mark.parametrize("k", [1, 2])
def test_a_step_whose_every_term_is_cut_to_weight_0_leaves_the_model_as_one_process_does(tmp_path, k):
    # was: DDP gave the model zero gradients (every term in the graph at weight 0), and AdamW decayed its weights;
    # one process computes no gradient, and the optimizer leaves the model alone
    (tmp_path / "recipe.toml").write_text(RECIPE.replace("max_epochs = 2", "max_epochs = 1") + (
        f'weight_decay = 0.5\naccumulate_batches = {k}\nlosses = [{{ use = "stagewise.cross_entropy", '
        'fallback_threshold = 0.0, fallback_factor = 0.0 }]\n'))
    _run(["-m", "stagewise", "run", "recipe.toml", "--out", "single", "--quiet"], tmp_path)
    _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
          "-m", "stagewise", "run", "recipe.toml", "--out", "ddp", "--quiet"], tmp_path)
    assert _summary(tmp_path / "ddp")["metrics"]["train/cross_entropy/fallbacks"] == 6 * k  # cut at every batch
    single, ddp = (stagewise.load_model(tmp_path / run).state_dict() for run in ("single", "ddp"))
    assert all(torch.equal(ddp[key], value) for key, value in single.items())
