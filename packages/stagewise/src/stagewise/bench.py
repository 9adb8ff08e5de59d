"""What the benchmark scripts in ``packages/*/bench/`` share: a folder that keeps every run
they make, their runs side by side on the machine's cores, a one-line error instead of a
traceback, and the table plus JSON line they print."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, cast

from stagewise.engine.rundir import empty_folder, unused_folder, write_text_atomic
from stagewise.engine.runner import run_recipe
from stagewise.errors import RunInterrupted, RunStopped, StagewiseError
from stagewise.recipe import Recipe


def add_set_option(parser: argparse.ArgumentParser, sets_itself: str) -> None:
    """``--set KEY=VALUE`` (repeatable, into ``args.overrides``), a recipe override as ``stagewise run``
    takes it, shared out as ``stagewise compare`` does (``compare.overrides_by_recipe``). The benchmark's own
    settings come first, so a user's win; ``sets_itself`` ends the help with what the script keeps to itself."""
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override a recipe key of the benchmark's runs, after its own settings (repeatable): "
                        "one on stages.NAME goes only to the recipes that have a stage NAME, as in 'stagewise "
                        f"compare'; the result records them under 'overrides'. {sets_itself}")


def run_benchmark(prog: str, measure: Callable[[Path], dict[str, Any]], table: Callable[[dict[str, Any]], str],
                  out: Path | None, default: str, json_path: Path | None = None) -> int:
    """``measure(out)`` with its runs kept under ``out`` (new or empty; default ``runs/<default>``,
    or ``-2``, ``-3``, ... when that holds files), so a run that finished survives a later one
    that fails. Prints ``table(result)`` and the result as one JSON line, writes it to
    ``json_path`` if given (making its folder), and returns the exit code."""
    out = Path(out) if out is not None else unused_folder(Path("runs") / default)
    try:
        empty_folder(out)
        result = measure(out)
    except StagewiseError as exc:
        print(f"{prog}: {exc}\n(finished runs, if any, are in {out})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C; a run it stopped is resumable (stagewise run --resume)
        print(f"{prog}: interrupted\n(finished runs, if any, are in {out})", file=sys.stderr)
        return 130
    print(table(result))
    print(json.dumps(result))
    if json_path is not None:  # atomic, its folder made: a reader never sees half a file
        write_text_atomic(json_path, json.dumps(result, indent=2) + "\n")
    return 0


def default_jobs() -> int:
    """Two runs at once where two cores are free to this process, else one: the runs are
    single-threaded, and more at once would share more of the memory bus and caches with the
    runs being timed (``--jobs`` can ask for more)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(2, cores)


def add_jobs_option(parser: argparse.ArgumentParser) -> None:
    """``--jobs N`` (into ``args.jobs``): how many of the benchmark's runs :func:`run_recipes` runs at once."""
    parser.add_argument("--jobs", type=_positive, default=default_jobs(), metavar="N",
                        help="runs at once, each in its own process (default: 2 on a machine with 2 or more "
                        "cores free, else 1). Each run gives the same numbers either way; a run's wall-clock "
                        "figures are measured beside the other runs, so --jobs 1 times everything alone")


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return int(text)


@dataclass(frozen=True)
class Finished:
    """A run :func:`run_recipes` made: its run directory and the wall-clock seconds it took."""

    path: Path
    seconds: float


def run_recipes(runs: dict[str, tuple[Recipe, Path]], jobs: int = 1) -> dict[str, Finished]:
    """Run each named ``(recipe, out)`` quietly, ``jobs`` at a time, started in the order given.

    With ``jobs`` > 1 each run has a fresh process of its own (spawned: it finds the plugins by their
    entry points, as ``stagewise run`` does). A recipe's numbers do not depend on its process: the
    engine seeds every run and sets its threads (``run.threads``). The first run to fail ends the
    benchmark as it would one after another: the runs not started never start, and those running
    are stopped as SIGTERM stops a run (checkpointed, so ``stagewise run --resume`` goes on with
    them). Ctrl-C or a SIGTERM to this process stops them so too."""
    if jobs == 1 or len(runs) == 1:
        return {name: _timed_run(recipe, out) for name, (recipe, out) in runs.items()}
    waiting = list(runs.items())
    running: dict[Connection, tuple[str, BaseProcess]] = {}
    finished: dict[str, Finished] = {}
    context = multiprocessing.get_context("spawn")  # a fork would copy this process's torch thread pools
    with _exit_on_sigterm():
        try:
            while waiting or running:
                while waiting and len(running) < jobs:
                    name, (recipe, out) = waiting.pop(0)
                    receive, send = context.Pipe(duplex=False)
                    process = context.Process(target=_run_in_worker, args=(recipe, out, send), name=f"run {name}")
                    process.start()
                    send.close()  # this process's copy: the child's end closing is then the end of the pipe
                    running[receive] = (name, process)
                for ready in wait(list(running)):
                    receive = cast(Connection, ready)  # one of those it was given
                    name, ended = running.pop(receive)
                    finished[name] = _outcome(name, receive, ended)
        except BaseException as exc:
            # Ctrl-C in a terminal reaches the runs too, which stop on their own: a moment before SIGTERM
            grace = 5.0 if isinstance(exc, KeyboardInterrupt) else 0.0
            _stop([process for _, process in running.values()], grace)
            raise
    return {name: finished[name] for name in runs}


def _timed_run(recipe: Recipe, out: Path) -> Finished:
    started = time.perf_counter()
    path = run_recipe(recipe, out=out, quiet=True)
    return Finished(path, time.perf_counter() - started)


def _run_in_worker(recipe: Recipe, out: Path, send: Connection) -> None:
    """:func:`_timed_run` in a worker process; sends its :class:`Finished`, or its error as a
    StagewiseError of its message: the subclasses' constructors take other arguments than the
    message a pickle would give them, and a stopped run's RunInterrupted is a KeyboardInterrupt."""
    try:
        send.send(_timed_run(recipe, out))
    except RunStopped as exc:
        send.send(StagewiseError(f"{exc.run_dir} {exc}"))
    except RunInterrupted as exc:
        send.send(StagewiseError(f"{exc.run_dir} was interrupted"))
    except StagewiseError as exc:
        send.send(StagewiseError(str(exc)))
    finally:
        send.close()


def _outcome(name: str, receive: Connection, process: BaseProcess) -> Finished:
    """What the run's process sent (its error raised), once it has ended."""
    try:
        outcome = receive.recv()
    except EOFError:  # it ended without a word: killed, or a bug, whose traceback it printed
        process.join()
        code = process.exitcode or 0
        how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        raise StagewiseError(f"run {name!r} ended ({how}) before it finished; see the output above") from None
    finally:
        receive.close()
    process.join()
    if isinstance(outcome, StagewiseError):
        raise outcome
    return cast(Finished, outcome)


def _stop(processes: list[BaseProcess], grace: float) -> None:
    """Stop the runs still going after ``grace`` seconds as SIGTERM does (at their next checkpoint),
    and wait for them."""
    deadline = time.monotonic() + grace
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive() and process.pid is not None:
            os.kill(process.pid, signal.SIGTERM)
    for process in processes:
        process.join()


@contextmanager
def _exit_on_sigterm() -> Iterator[None]:
    """SIGTERM to this process raises SystemExit(143), on which :func:`run_recipes` stops its runs, which
    would otherwise train on, orphaned. Only the main thread may set a handler: elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _exit_143)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_143(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)
