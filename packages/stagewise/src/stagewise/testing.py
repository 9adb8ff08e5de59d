"""Helpers for plugin test suites: prove that a plugin keeps the resume guarantee.

``run_killed`` runs ``stagewise run`` in a child process that kills itself with SIGKILL at a
chosen point, the way a crash or an out-of-memory kill would end it (no ``finally``, no atexit;
on Windows, which has no signals, ``os._exit`` skips them alike); ``run_terminated`` sends it
SIGTERM there instead, as a cluster's preemption does, and the run stops at its next checkpoint;
``resume_run`` continues that run in its folder with ``--resume``. Compare the result with an
uninterrupted run of the same recipe (``run_uninterrupted``): ``summary.json`` equal, and
``timeless_records`` equal.

``run_stopped`` stops a run in this process as Ctrl-C would, and ``damaged_copy`` copies it with
its ``last.pt`` changed: for tests that a resume refuses what a run never writes.

``run_child`` runs a command as ``subprocess.run`` does, but a timeout stops every process the
command started, torchrun's workers included; the run helpers above use it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

import stagewise
from stagewise.cli.commands import set_args

if TYPE_CHECKING:
    from collections.abc import Callable

    from stagewise.recipe import Recipe

# The CLI, with a plugin that SIGKILLs the process (or sends it SIGTERM: "term") after step N of a stage or
# as a stage starts.
_KILLER = textwrap.dedent("""
    import os, signal, sys, time
    import stagewise
    from stagewise.plugins import register_plugin
    from stagewise.cli.main import main

    stage, step, killed, how = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]

    def die():
        if how == "term":
            terminate()
            return
        if hasattr(signal, "SIGKILL"):
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(killed)  # Windows: no signals

    def terminate():
        from stagewise.engine.signals import requested

        if os.environ.get("RANK", "0") != "0":
            return
        torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1  # its agent passes the signal on to every process
        os.kill(os.getppid() if torchrun else os.getpid(), signal.SIGTERM)
        while requested() is None:  # until it has reached this process: every process stops after the next step
            time.sleep(0.01)

    class Killer:
        @stagewise.hookimpl
        def stagewise_after_step(self, state):
            if step > 0 and (state.stage_name, state.step) == (stage, step):
                die()

        @stagewise.hookimpl
        def stagewise_before_stage(self, state):
            if step == 0 and state.stage_name == stage:
                die()

    register_plugin(Killer(), "stagewise.testing.killer")
    sys.exit(main(sys.argv[5:]))
""")
# how long a run helper waits for its child: far longer than a test's tiny run, but a job whose processes wait on each
# other forever (a collective one of them never joins) ends the test instead of the test session
TIMEOUT_S = 600
# the exit code of a child that killed itself: -9 where it could send itself SIGKILL, else (Windows)
# the one its os._exit gave, a shell's code for a SIGKILL
_KILLED = -signal.SIGKILL if hasattr(signal, "SIGKILL") else 128 + 9


def _python(processes: int) -> list[str]:
    """This Python, or ``processes`` of it started by torchrun (on CPU: the gloo backend)."""
    if processes == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            "--no-python", sys.executable]


def run_killed(recipe: str | Path, out: str | Path, stage: str, step: int = 0,
               overrides: Sequence[str] = (), processes: int = 1, timeout: float = TIMEOUT_S) -> None:
    """Run RECIPE into OUT and SIGKILL it after optimizer step STEP of STAGE (counted from 1 within
    the stage), or, with step 0, as STAGE starts (the stage before it has written its checkpoint).
    With ``processes`` > 1 the run is data-parallel under torchrun, and every rank kills itself.

    Raises AssertionError, with the child's stderr, when the run was not killed there (it
    finished first, failed, or never reached STAGE); ``subprocess.TimeoutExpired`` when it ran
    past ``timeout`` seconds (see :func:`run_child`)."""
    child = _run_stopping(recipe, out, stage, step, "kill", overrides, processes, timeout)
    killed = (child.returncode == _KILLED if processes == 1  # torchrun exits 1 and names the signal
              else child.returncode != 0 and "Signal 9 (SIGKILL)" in child.stderr)
    if not killed:
        raise AssertionError(f"the run was to be killed at {_at(stage, step)} but exited with {child.returncode}:\n"
                             f"{child.stderr}")


def run_terminated(recipe: str | Path, out: str | Path, stage: str, step: int = 0,
                   overrides: Sequence[str] = (), processes: int = 1, timeout: float = TIMEOUT_S) -> str:
    """Run RECIPE into OUT and send it SIGTERM, as a cluster's preemption does, after optimizer step STEP of
    STAGE (counted from 1 within the stage), or, with step 0, as STAGE starts. The run stops after the step in
    flight, once it has checkpointed there: after STEP (step 1 of STAGE with step 0) in one process. With
    ``processes`` > 1 the run is data-parallel under torchrun, and rank 0 sends the signal to torchrun, which
    passes it on to every process (as when a cluster signals the job); rank 0 waits for it, so the processes
    stop after the step that follows. POSIX only (Windows has no SIGTERM to handle).

    Returns the child's stderr, which says where the run stopped and how to resume it. Raises AssertionError,
    with that stderr, when the run did not stop so (it finished first, failed, or never reached STAGE);
    ``subprocess.TimeoutExpired`` when it ran past ``timeout`` seconds (see :func:`run_child`)."""
    child = _run_stopping(recipe, out, stage, step, "term", overrides, processes, timeout)
    # 128 + SIGTERM from stagewise; torchrun exits 1 after its workers, whatever their status
    stopped = "stagewise: stopped by SIGTERM" in child.stderr and child.returncode == (143 if processes == 1 else 1)
    if not stopped:
        raise AssertionError(f"the run was to stop on SIGTERM at {_at(stage, step)} but exited with "
                             f"{child.returncode}:\n{child.stderr}")
    return child.stderr


def _run_stopping(recipe: str | Path, out: str | Path, stage: str, step: int, how: str, overrides: Sequence[str],
                  processes: int, timeout: float) -> subprocess.CompletedProcess[str]:
    """``stagewise run RECIPE --out OUT`` in a child whose plugin stops it (``how``: kill, term) at ``step``."""
    return run_child([*_python(processes), "-c", _KILLER, stage, str(step), str(abs(_KILLED)), how, "run",
                      str(recipe), "--out", str(out), "--quiet", *set_args(overrides)], timeout=timeout)


def _at(stage: str, step: int) -> str:
    return f"step {step} of {stage!r}" if step else f"the start of {stage!r}"


def run_uninterrupted(recipe: str | Path, out: str | Path, overrides: Sequence[str] = (), processes: int = 1,
                      timeout: float = TIMEOUT_S) -> None:
    """``stagewise run RECIPE --out OUT`` in a child process, the run to compare a resumed one
    with; AssertionError with its stderr when it fails, TimeoutExpired past ``timeout`` seconds."""
    _stagewise_run(recipe, ["--out", str(out)], overrides, processes, timeout, f"running {recipe} into {out}")


def resume_run(recipe: str | Path, run_dir: str | Path, overrides: Sequence[str] = (), processes: int = 1,
               timeout: float = TIMEOUT_S) -> None:
    """``stagewise run RECIPE --resume RUN_DIR`` in a child process (under torchrun with
    ``processes`` > 1); AssertionError with its stderr when it fails, TimeoutExpired past ``timeout`` seconds."""
    _stagewise_run(recipe, ["--resume", str(run_dir)], overrides, processes, timeout, f"resuming {run_dir}")


def _stagewise_run(recipe: str | Path, where: list[str], overrides: Sequence[str], processes: int, timeout: float,
                   what: str) -> None:
    child = run_child([*_python(processes), "-m", "stagewise", "run", str(recipe), *where, "--quiet",
                       *set_args(overrides)], timeout=timeout)
    if child.returncode != 0:
        raise AssertionError(f"{what} exited with {child.returncode}:\n{child.stderr}")


def run_child(command: Sequence[str], *, timeout: float, cwd: str | Path | None = None,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)``, except
    that a command running past ``timeout`` seconds (or stopped by Ctrl-C) is killed with every process it
    started before ``subprocess.TimeoutExpired`` (KeyboardInterrupt) is raised. ``subprocess.run`` kills the
    command alone: torchrun's workers, each in a session of its own, outlived it, waiting forever on each other."""
    with subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as child:
        try:
            stdout, stderr = child.communicate(timeout=timeout)
        except BaseException:  # the timeout, or Ctrl-C, which no longer reaches a child in a session of its own
            _kill_tree(child.pid)
            raise
    return subprocess.CompletedProcess(child.args, child.returncode, stdout, stderr)


def _kill_tree(pid: int) -> None:
    """SIGKILL process ``pid``, its process group and every process it started, looked up before any of them dies
    (an orphan's parent is no longer ``pid``'s descendant). On Windows, ``taskkill /T`` walks the tree."""
    if not hasattr(os, "killpg"):
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(pid)], capture_output=True)
        return
    tree = _descendants(pid)
    with suppress(ProcessLookupError):  # the whole group has ended meanwhile
        os.killpg(pid, signal.SIGKILL)  # run_child started it in a session, and so a group, of its own
    for process in tree:
        with suppress(ProcessLookupError):
            os.kill(process, signal.SIGKILL)


def _descendants(pid: int) -> list[int]:
    """The processes ``pid`` started, those they started, and so on."""
    children: dict[int, list[int]] = {}
    for process, parent in _parents().items():
        children.setdefault(parent, []).append(process)
    found, todo = [], [pid]
    while todo:
        started = children.get(todo.pop(), [])
        found += started
        todo += started
    return found


def _parents() -> dict[int, int]:
    """Each running process's parent: from /proc on Linux, else from ``ps`` (macOS, the BSDs)."""
    if not os.path.isdir("/proc"):
        listed = subprocess.run(["ps", "-A", "-o", "pid=", "-o", "ppid="], capture_output=True, text=True).stdout
        return {int(pid): int(ppid) for pid, ppid in map(str.split, listed.splitlines())}
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with suppress(OSError):  # ended meanwhile
            # "PID (COMMAND) STATE PPID ...": the command may hold spaces and parentheses, so split after its last ")"
            parents[int(stat.parent.name)] = int(stat.read_bytes().rpartition(b")")[2].split()[1])  # bytes: any name
    return parents


def timeless_records(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of RUN_DIR's metrics.jsonl without their wall-clock ``seconds``: what a resumed
    run must reproduce exactly."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]


class _Stop:
    """A plugin that raises KeyboardInterrupt after step ``step`` of ``stage``, or with step 0 as it starts."""

    def __init__(self, stage: str, step: int) -> None:
        self.stage, self.step = stage, step

    @stagewise.hookimpl
    def stagewise_after_step(self, state: Any) -> None:
        if self.step > 0 and (state.stage_name, state.step) == (self.stage, self.step):
            raise KeyboardInterrupt

    @stagewise.hookimpl
    def stagewise_before_stage(self, state: Any) -> None:
        if self.step == 0 and state.stage_name == self.stage:
            raise KeyboardInterrupt


def run_stopped(recipe: Recipe, out: str | Path, stage: str, step: int = 0) -> Path:
    """Run ``recipe`` into OUT in this process and stop it as Ctrl-C does, after optimizer step STEP
    of STAGE or, with step 0, as STAGE starts; OUT, holding the run's last.pt. AssertionError when
    the run was not stopped there."""
    from stagewise.engine.runner import run_recipe
    from stagewise.plugins import register_plugin, unregister_plugin

    register_plugin(_Stop(stage, step), "stagewise.testing.stop")
    try:
        run_recipe(recipe, out=Path(out), quiet=True)
    except KeyboardInterrupt:
        return Path(out)
    finally:
        unregister_plugin("stagewise.testing.stop")
    raise AssertionError(f"the run was to be stopped at step {step} of {stage!r} but finished")


def damaged_copy(run_dir: str | Path, into: str | Path, damage: Callable[[dict[str, Any]], Any]) -> Path:
    """A copy of the run RUN_DIR at INTO whose checkpoints/last.pt ``damage`` changed (it gets the
    loaded checkpoint and changes it in place); INTO."""
    import torch

    run = Path(shutil.copytree(run_dir, into))
    last = run / "checkpoints" / "last.pt"
    saved = torch.load(last, weights_only=True)
    damage(saved)
    torch.save(saved, last)
    return run
