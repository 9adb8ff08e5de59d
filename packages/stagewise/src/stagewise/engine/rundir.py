"""The run directory: everything one execution produced.

::

    RUN_DIR/
      recipe.toml        the resolved recipe (defaults filled in, overrides applied)
      env.json           python, torch, platform, CPU kind, threads, processes, every plugin's distribution and version
      metrics.jsonl      one JSON object per logged event (step, epoch, stage, grow, plugins' own)
      summary.json       per-stage metrics and timings, and the final metrics
      checkpoints/       <stage checkpoint name>.pt after each stage, last.pt for resuming
      plots/             PNGs some stages draw (with the [plots] extra)
      tensorboard/       TensorBoard scalars, with [run] tensorboard = true: <stage>/steps, <stage>/epochs
      vocab.txt          a text corpus's vocabulary (RunDir.create's ``files``)
"""

from __future__ import annotations

import itertools
import json
import math
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from stagewise.engine.atomic import TEMP_GLOB, atomic_write_bytes, remove_temp_files
from stagewise.engine.cpu import cpu_kind
from stagewise.engine.distributed import launched_world_size
from stagewise.errors import CheckpointError, PluginError


class RunDir:
    """Writes a run directory; only the main process has one."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self._metrics: BinaryIO | None = None
        self.lines = 0  # records in metrics.jsonl, saved in checkpoints to cut on resume
        self._on_close: list[Callable[[], None]] = []

    @classmethod
    def create(cls, path: Path, recipe_toml: str, env: dict[str, Any],
               files: dict[str, str] | None = None, again: bool = False) -> RunDir:
        """A new run directory holding the recipe, the environment and ``files`` (name -> text);
        ``again``: the folder of a run stopped before its first checkpoint, whose files are written anew."""
        if not again:
            path = empty_folder(path, f"pass --resume {path} to continue that run, or --out with a new folder")
        run = cls(path)
        # recipe.toml first: it makes the folder a run directory; a run killed before it is in
        # place leaves a folder with nothing in it (but a temp file), which --out takes again
        try:  # a new run's is never written over: another run started at once may have put its own there
            write_text_atomic(path / "recipe.toml", recipe_toml, replace=again)
        except (FileExistsError, FileNotFoundError) as exc:  # not found: the other run took our temp file away
            if isinstance(exc, FileNotFoundError) and (again or not (path / "recipe.toml").exists()):
                raise
            raise CheckpointError(f"{path} was taken by another run started at the same time; pass --out with "
                                  f"a new folder (or run again: a default folder is numbered past it)") from None
        run.remove_temp_files()  # only now the folder is this run's: before, they may be another run's, in use
        run.checkpoints.mkdir(exist_ok=True)
        write_json_atomic(path / "env.json", env)
        for name, text in (files or {}).items():
            write_text_atomic(path / name, text)
        write_text_atomic(path / "metrics.jsonl", "")  # replaces, never follows, a link a handed-over folder holds
        return run

    @classmethod
    def reopen(cls, path: Path, lines: int) -> RunDir:
        """Continue a run: drop the temp files of writes a kill cut short, and cut metrics.jsonl back
        to the records the checkpoint had seen.

        A line cut short (the file lost its end) is dropped, so that the next record starts a line
        of its own; records the checkpoint counted but the file lacks are reported, not invented."""
        run = cls(path)
        run.remove_temp_files()
        metrics = run.path / "metrics.jsonl"
        kept = []  # how many records the copy kept, set as it is written
        atomic_write_bytes(metrics, lambda out: kept.append(_copy_records(metrics, lines, out)))
        if kept[0] < lines:
            print(f"stagewise: warning: {metrics} holds {kept[0]} complete records, but the checkpoint "
                  f"counted {lines}; the missing records are lost, the run goes on", file=sys.stderr)
        run.lines = kept[0]
        return run

    def remove_temp_files(self) -> None:
        """Drop the temp files of writes a kill cut short (SIGKILL: no cleanup ran)."""
        for folder in (self.path, self.checkpoints, self.path / "plots"):
            remove_temp_files(folder)

    def log(self, record: dict[str, Any]) -> None:
        path = self.path / "metrics.jsonl"
        if self._metrics is None:  # unbuffered: a write the disk refused is not kept to fail again at close
            self._metrics = open(path, "ab", buffering=0)
        try:
            line = json.dumps(finite(record))
        except TypeError as exc:  # a tensor or numpy number a stage returned or a plugin logged: name it
            raise PluginError(_unwritable_message(record, exc)) from None
        data = (line + "\n").encode("utf-8")
        try:
            while data:  # a disk filling up writes part of it, then refuses the rest
                data = data[self._metrics.write(data):]
        except OSError as exc:  # a write's error names no file: "PATH: No space left on device"
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        self.lines += 1

    def on_close(self, close: Callable[[], None]) -> None:
        """Call ``close`` when the run ends, finished or failed: for what a plugin opens in the
        run directory (a TensorBoard writer), so that it is closed whatever happens."""
        self._on_close.append(close)

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        while self._on_close:
            self._on_close.pop()()

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json_atomic(self.path / "summary.json", summary)

    def plot_path(self, name: str) -> Path:
        """Where a plot goes; ``line_plot`` makes the folder when it draws one."""
        return self.path / "plots" / name


def unused_folder(base: Path) -> Path:
    """``base``, or the first of ``base-2``, ``base-3``, ... that is missing or an empty folder:
    a default output folder never mixes with an earlier run's (a file of that name is passed over)."""
    base = Path(base)
    candidate, n = base, 1
    while candidate.exists() and (not candidate.is_dir() or any(candidate.iterdir())):
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def file_in_the_way(path: Path) -> Path | None:
    """The file at ``path`` or at one of its parents, where a folder would have to be; else None."""
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    return existing if existing is not None and not existing.is_dir() else None


def empty_folder(path: Path, advice: str = "pass --out with a new folder") -> Path:
    """``path`` if it is missing or an empty folder; a folder the user named is never written
    into twice."""
    path = Path(path)
    blocking = file_in_the_way(path)
    if blocking == path:
        raise CheckpointError(f"{path} is a file, not a folder; {advice}")
    if blocking is not None:
        raise CheckpointError(f"{path} cannot be created: {blocking} is a file, not a folder; pass --out "
                              f"with a path in a folder")
    if path.exists() and holds_files(path):
        raise CheckpointError(f"{path} is not empty; {advice}")
    return path


def holds_files(folder: Path) -> bool:
    """Whether ``folder`` holds anything but the temp files of writes a kill cut short."""
    return any(not p.match(TEMP_GLOB) for p in folder.iterdir())


NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}  # as finite() writes them


def read_number(value: Any) -> Any:
    """A value as :func:`finite` wrote it, read back: "nan", "inf" and "-inf" as floats again."""
    return NON_FINITE.get(value, value) if isinstance(value, str) else value


def finite(value: Any) -> Any:
    """JSON has no NaN/Inf: write them as strings so every line stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def _copy_records(metrics: Path, lines: int, out: BinaryIO) -> int:
    """Copy the first ``lines`` complete records of ``metrics`` (absent: none) to ``out``, a line at a
    time (a long run's file can be far larger than memory); returns how many it copied. A line cut
    short, the file's last, is left out, so that the next record starts a line of its own."""
    if not metrics.exists():
        return 0
    copied = 0
    with open(metrics, encoding="utf-8", errors="replace", newline="\n") as records:
        for line in itertools.islice(records, lines):
            if not line.endswith("\n"):
                break
            out.write(line.encode("utf-8"))
            copied += 1
    return copied


def write_text_atomic(path: Path, text: str, replace: bool = True) -> None:
    atomic_write_bytes(path, lambda f: f.write(text.encode("utf-8")), replace)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(finite(data), indent=2, sort_keys=False) + "\n")


def environment() -> dict[str, Any]:
    import torch

    from stagewise.plugins import plugin_infos

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu_kind(),  # CPU metrics are bit-identical on the same kind of CPU only
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "processes": launched_world_size(),  # a torchrun job's sums run in another order than one process's
        "plugins": {i.name: {"distribution": i.distribution, "version": i.version, "error": i.error}
                    for i in plugin_infos()},
    }


def _unwritable_message(record: dict[str, Any], exc: TypeError) -> str:
    bad = ", ".join(f"{k!r} (a {t})" for k, t in ((k, _unwritable(v)) for k, v in record.items()) if t)
    bad = bad or f"a value ({exc})"  # e.g. a dict with tuple keys
    return (f"stage {record.get('stage')!r} logged {bad} in its {record.get('event')!r} record, which metrics.jsonl "
            f"cannot hold: log numbers, strings, booleans, None, or lists and dicts of them "
            f"(e.g. tensor.item(), tensor.tolist())")


def _unwritable(value: Any) -> str | None:
    """The type name of the first part of ``value`` that JSON cannot write; None if it can."""
    if isinstance(value, dict | list | tuple):
        parts = value.values() if isinstance(value, dict) else value
        return next((t for t in map(_unwritable, parts) if t), None)
    return None if isinstance(value, str | int | float | type(None)) else type(value).__name__
