"""A torchrun job's processes: a timeout or Ctrl-C stops every one, an error is said once and ends
the job, rank 0 alone writes and picks the run folder, and a CUDA job's collectives go where NCCL
needs them."""

from __future__ import annotations

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
from ddp_jobs import RECIPE, child, environment, launcher, needs_gloo, torchrun

from stagewise.engine.distributed import DistInfo, collective_device, setup
from stagewise.plots import have_matplotlib
from stagewise.testing import run_child

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
                  timeout=15, cwd=tmp_path, env=environment())
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


@needs_gloo
def test_a_bad_recipe_under_torchrun_is_said_once_and_writes_nothing(tmp_path):
    # was: each process printed the same recipe error, once per process
    (tmp_path / "recipe.toml").write_text(RECIPE)
    done = torchrun(["run", "recipe.toml", "--set", "stages.train.lr=-1", "--out", "ddp"], tmp_path)
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
    done = child(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "late_rank_0.py", "run",
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
    (tmp_path / "launch.py").write_text(launcher(ONE_SHARE, "OneShare"))
    (tmp_path / "recipe.toml").write_text(RECIPE + (
        'losses = [{ use = "stagewise.cross_entropy" }, { use = "ddptest.one_share", weight = 0.1 }]\n'))
    done = child(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
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
    done = child(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "in_the_way.py", "run",
                  "recipe.toml", "--out", "ddp", "--quiet"], tmp_path)
    assert done.returncode != 0
    assert done.stderr.count(f"stagewise: error: {Path('ddp', 'checkpoints')}: ") == 1, done.stderr
    assert not re.search(r"\[rank\d\]: Traceback", done.stderr), done.stderr


@needs_gloo
def test_an_error_every_process_meets_in_its_run_is_said_once(tmp_path):
    # was: every process said it (a training error was not left to rank 0, as it may be one process's alone)
    (tmp_path / "recipe.toml").write_text(RECIPE.replace("grad_clip = 1.0\n", ""))
    done = torchrun(["run", "recipe.toml", "--out", "ddp", "--quiet", "--set", "stages.train.optimizer='sgd'",
                     "--set", "stages.train.lr=1e29"], tmp_path)  # diverges at the first step
    assert done.returncode != 0
    assert done.stderr.count("stagewise: error: non-finite loss (nan) at stage 'train'") == 1, done.stderr


@needs_gloo
def test_compare_under_torchrun_prints_its_table_once(tmp_path):
    # was: every process printed the table and wrote compare.json
    (tmp_path / "a.toml").write_text(RECIPE.replace("max_epochs = 2", "max_epochs = 1"))
    (tmp_path / "b.toml").write_text(RECIPE.replace("max_epochs = 2", "max_epochs = 1").replace('"ddp"', '"other"'))
    done = torchrun(["compare", "a.toml", "b.toml", "--quiet", "--out", "cmp"], tmp_path)
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
    done = child(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "late_rank.py"], tmp_path)
    assert done.returncode == 0, done.stderr
    # a file per process: their prints, through torchrun's one pipe, could interleave
    assert [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)] == ["runs/ddp", "runs/ddp"]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["ddp"]
