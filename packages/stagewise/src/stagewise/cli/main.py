"""Entry point of the ``stagewise`` command: parse arguments, dispatch, turn errors into messages.

Library code raises typed :mod:`stagewise.errors`; this is the one place that turns them into
a one-paragraph message on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import traceback

from stagewise.cli import commands
from stagewise.engine.failures import noted
from stagewise.errors import PluginError, StagewiseError
from stagewise.plugins import strict


def build_parser() -> argparse.ArgumentParser:
    from stagewise import __version__
    from stagewise.plugins import register_commands

    parser = argparse.ArgumentParser(
        prog="stagewise",
        description="Staged neural-network training: run recipes of stages with pluggable "
                    "stages, routers and losses.")
    parser.add_argument("--version", action="version", version=f"stagewise {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_core_commands(sub)
    register_commands(sub)
    return parser


_PERMISSIONS = "check its permissions, or choose another folder"
# what to do when the file system refuses, by errno (OSError.errno, which may be None)
_OS_ADVICE: dict[int | None, str] = {
    errno.EACCES: _PERMISSIONS, errno.EPERM: _PERMISSIONS, errno.ENOSPC: "free some disk space",
    errno.EDQUOT: "free some space within your disk quota", errno.EROFS: "choose a folder on a writable disk"}
# the refusals after which a stopped run goes on as it was, once there is room: its checkpoints are intact
_FULL = (errno.ENOSPC, errno.EDQUOT)


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit code. A process in which a run joined torchrun's process group
    ends here instead (see :func:`_end_torchrun_process`)."""
    try:
        code = _command(argv)
    except Exception as exc:  # a bug: its traceback, unless it only follows another process's failure
        if not _follows_another_process(exc):
            raise
        # its own error's first line: a bug of its own that came after another's failure is not lost unseen
        mine = f"{type(exc).__name__}: {exc}".splitlines()[0]
        print(f"stagewise: error: stopped, as another process of this torchrun job failed (see its error); here: "
              f"{mine}", file=sys.stderr)
        code = 1
    if _joined_a_group():
        _end_torchrun_process(code)
    return code


def _joined_a_group() -> bool:
    """Whether a run of this process, in a torchrun job, joined its process group."""
    distributed = sys.modules.get("stagewise.engine.distributed")  # not imported: no run joined a group
    return distributed is not None and distributed.launched_world_size() > 1 and distributed.joined_a_group()


def _follows_another_process(exc: Exception) -> bool:
    """Whether the bug ``exc`` of a torchrun process only follows another process's failure, which that one has
    said: a collective broke off (gloo: 'Connection closed by peer') as the process it waited for ended. Its
    traceback would name the plugin that called the collective as the one to report it to. Any other bug of a
    process in a group marks the job failed, for the other processes to know theirs."""
    if not _joined_a_group():
        return False
    from stagewise.engine import distributed

    # a collective that broke off raises a RuntimeError (gloo's own, NCCL's DistBackendError)
    if isinstance(exc, RuntimeError) and distributed.another_process_failed():
        return True
    distributed.mark_failed()
    return False


def _end_torchrun_process(code: int) -> None:
    """End the process without Python's shutdown. torch's gloo worker threads outlive the process
    group (torch._dynamo, which DistributedDataParallel imports, keeps references to it), and one
    still letting go of a collective's tensor once shutdown has begun aborts the process ('terminate
    called without an active exception', SIGABRT), after the run's files were written: torchrun then
    fails the whole job. Every file of the command is closed by now; only the standard streams need
    flushing."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader gone away, a closed stream: nothing more to show
            pass
    os._exit(code)


def _command(argv: list[str] | None) -> int:
    try:
        parser = build_parser()
        with noted("parsing the command line"):  # argparse runs a plugin's type= and actions here
            args = parser.parse_args(argv)
        if getattr(args, "handler", None) is None:
            parser.print_help()
            return 2
        # a bug in a plugin's command, or in plugin code a core command calls; the file system refusing a
        # path, as it may be one the command was given, is the one line below (a run notes a plugin's own)
        with noted(f"in command {args.command!r}", passing=(OSError,)):
            code = int(args.handler(args) or 0)
        sys.stdout.flush()  # a reader gone away shows here, not as "Exception ignored" at exit
        return code
    except StagewiseError as exc:
        if _said_by_another_process(exc):
            return 1
        if isinstance(exc, PluginError) and exc.__cause__ is not None and strict():
            traceback.print_exception(exc.__cause__)  # strict mode is for finding the bug: show where
        print(f"stagewise: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # the reader of stdout stopped (`stagewise recipes | head -1`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit would fail again
        return 141  # 128 + SIGPIPE, as shells report for a command a closed pipe ended
    except OSError as exc:  # the file system said no: no permission, a file where a folder should be, disk full
        from stagewise.engine.failures import blames_plugin

        if blames_plugin(exc):  # a plugin's own file handling in a run, not a path the user gave to core
            raise  # a bug: its traceback, with the note that says whom to report it to
        if _said_by_another_process(exc):
            return 1
        where = "".join(f"{name}: " for name in (exc.filename, exc.filename2) if name is not None)
        print(f"stagewise: error: {where}{exc.strerror or exc}; {_os_advice(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stagewise: interrupted", file=sys.stderr)
        return 130


def _said_by_another_process(exc: StagewiseError | OSError) -> bool:
    """Whether another process of this torchrun job prints ``exc`` for this one, as it met the same error first
    (see :func:`~stagewise.engine.distributed.first_to_report`, which also marks the job failed, so the others'
    broken-off collectives are one line each): the processes check a recipe and its data alike, so its errors
    would show once per process; an error in a run (a full disk as rank 0 writes) may be every process's or one's
    alone."""
    if os.environ.get("WORLD_SIZE", "1") == "1":  # one process: torch stays unimported for a light command
        return False
    from stagewise.engine.distributed import first_to_report

    return not first_to_report(str(exc))


def _os_advice(exc: OSError) -> str:
    """What to do when the file system refused: fix it; for a full disk, then resume the run it stopped
    (not start it again), or run the command again."""
    fix = _OS_ADVICE.get(exc.errno, "check the path")
    if exc.errno not in _FULL:
        return fix
    again = getattr(exc, "continue_with", None)  # set by run and compare once their folder holds a run
    return f"{fix}; {again}" if again else f"{fix} and run again"

