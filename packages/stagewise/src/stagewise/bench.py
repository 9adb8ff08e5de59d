"""What the benchmark scripts in ``packages/*/bench/`` share: a folder that keeps every run
they make, a one-line error instead of a traceback, and the table plus JSON line they print."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stagewise.engine.rundir import empty_folder, unused_folder, write_text_atomic
from stagewise.errors import StagewiseError


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
    print(table(result))
    print(json.dumps(result))
    if json_path is not None:  # atomic, its folder made: a reader never sees half a file
        write_text_atomic(json_path, json.dumps(result, indent=2) + "\n")
    return 0
