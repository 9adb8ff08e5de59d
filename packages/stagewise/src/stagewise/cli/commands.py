"""Core's subcommands: plugins, recipes, run, compare, show, verify, export; and cache (:mod:`stagewise.cli.cache`)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stagewise import plugins
from stagewise.cli.cache import add_cache_command
from stagewise.errors import CheckpointError, RunInterrupted, RunStopped
from stagewise.registry import KINDS


def add_core_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plugins", help="list installed plugins and what they register")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.set_defaults(handler=cmd_plugins)

    p = sub.add_parser("recipes", help="list the recipes plugins ship (run one by name)")
    p.add_argument("--json", action="store_true", help="print a JSON object name -> path")
    p.set_defaults(handler=cmd_recipes)

    p = sub.add_parser("run", help="run a recipe file or a named recipe",
                       description="Run a recipe file or a named recipe. Prints the run directory as it starts "
                       "(metrics.jsonl and checkpoints are written there as it goes) and a table of the results "
                       "at the end.")
    p.add_argument("recipe", help="a .toml file or a registered recipe name (see 'stagewise recipes')")
    _add_recipe_args(p)
    where = p.add_mutually_exclusive_group()  # a resumed run goes on in its own folder
    where.add_argument("--out", type=_path, help="the run directory to create (default: RUN.OUT/RUN.NAME)")
    where.add_argument("--resume", type=_path, metavar="RUN_DIR",
                       help="continue an interrupted run from its last checkpoint")
    p.set_defaults(handler=cmd_run)

    p = sub.add_parser("compare", help="run several recipes on the same data and seed, print one table",
                       description="Run several recipes on the same data and seed, print one table. A --set "
                       "on stages.NAME goes only to the recipes that have a stage NAME, one on "
                       "stages.NAME.losses.TERM only to those whose stage NAME has a loss term TERM. Each recipe "
                       "runs in OUT/<run.name>: run names that are one folder where case or Unicode normalisation is "
                       "ignored (macOS, Windows), e.g. Base and base, are refused before any run. The table goes to "
                       "OUT/compare.json; with matplotlib (the [plots] extra), OUT/compare.png shows each run's "
                       "val/loss per epoch.")
    p.add_argument("recipes", nargs="+", help="recipe files or names, e.g. the baseline then the method")
    _add_recipe_args(p)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", type=_path, help="parent folder of the runs (default: runs/compare, or runs/compare-2, "
                       "... when that holds files)")
    where.add_argument("--resume", type=_path, metavar="OUT",
                       help="continue a stopped comparison in OUT, with the same recipes and --set: its runs "
                       "go on from their last checkpoints, finished ones are not run again")
    p.set_defaults(handler=cmd_compare)

    p = sub.add_parser("show", help="print finished runs' results: one run's final table, or several side by side",
                       description="Print the results of finished runs from their summary.json: for one run, the "
                       "table 'stagewise run' printed at its end; for several, their final metrics side by side "
                       "with each later run's change against the first, as 'stagewise compare' prints them.")
    p.add_argument("run_dirs", nargs="+", type=_path, metavar="RUN_DIR",
                   help="run directories holding summary.json, e.g. the baseline's first; the --out folder of "
                   "'stagewise compare' stands for its runs")
    p.set_defaults(handler=cmd_show)

    p = sub.add_parser("verify", help="compare a run's final metrics with a golden record")
    p.add_argument("run_dir", help="a run directory holding summary.json")
    p.add_argument("golden", help='a JSON file {"metrics": {...}, "tolerance": {...}}, e.g. another run\'s '
                   "summary.json; the run's wall-clock measurements are compared only if given a tolerance")
    p.add_argument("--add-cpu-record", action="store_true",
                   help="add the run's values of the golden metrics to the golden file as the record for the run's "
                   "kind of CPU (its \"by_cpu\"), or of GPU for a run on one, where the file has none: CPU numbers "
                   "are bit-identical on the same kind only (AVX2, AVX512, ...); do it with a run of the same recipe "
                   "and code as the file's records. A run that matches a record whose kind is not said exactly names "
                   "that record instead; one farther than the file's \"cpu_tolerance\" from every record is refused "
                   "(a behaviour change)")
    p.set_defaults(handler=cmd_verify)

    p = sub.add_parser("export", help="export a checkpoint's model to a numpy-only .npz",
                       description="Export a checkpoint's model to a numpy-only .npz (numpy.load(path, "
                       "allow_pickle=False) reads it): the model's weights, named as in its state dict; what "
                       "plugins keep beside the model, the checkpoint's artifacts (e.g. a Koopman term's trained "
                       "φ, K, ψ), as arrays named artifacts/<name>/<key>/...; and __meta__, a JSON string with "
                       "the model, its options, the routers, the vocabulary and the artifacts' plain values "
                       "(stagewise.export.load_npz puts the arrays back in place there). With torch, "
                       "stagewise.load_model(path) rebuilds the model from it.")
    p.add_argument("source", type=_path, help="a run directory (its last checkpoint) or a .pt checkpoint")
    p.add_argument("out", type=_path, help="the .npz file to write (it may replace an earlier export, no other file)")
    p.add_argument("--exclude-artifact", action="append", default=[], metavar="NAME", dest="exclude",
                   help="leave out the artifact NAME (repeatable), e.g. a large cache a stage kept for "
                   "training; the command lists the checkpoint's artifacts when NAME is not one of them")
    p.set_defaults(handler=cmd_export)

    add_cache_command(sub)


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a recipe key, e.g. stages.phase1.max_epochs=3 (repeatable); '~KEY' removes a "
                   "key (its default applies), a stage (~stages.NAME) or a loss term (~stages.NAME.losses.TERM)")
    p.add_argument("--quiet", action="store_true", help="no progress bars, per-epoch lines or per-run tables "
                   "(run prints only the run directory, compare only its comparison table; warnings still go "
                   "to stderr)")


def cmd_plugins(args: argparse.Namespace) -> int:
    infos = plugins.plugin_infos()
    if args.json:
        print(json.dumps([i.as_dict() for i in infos], indent=2))
        return 0
    for info in infos:
        print(f"{info.name}  ({info.distribution} {info.version})")
        if info.error:
            print(f"  error: {info.error}")
        for kind in KINDS:
            if info.registered[kind]:
                print(f"  {kind}: {', '.join(info.registered[kind])}")
        if info.hooks:
            print(f"  hooks: {', '.join(h.removeprefix('stagewise_') for h in info.hooks)}")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    entries = plugins.registries()["recipes"].entries
    if args.json:
        print(json.dumps({name: str(e.target) for name, e in sorted(entries.items())}, indent=2))
        return 0
    for name, entry in sorted(entries.items()):
        print(f"{name:<32} {entry.distribution}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from stagewise.engine.distributed import is_main_process
    from stagewise.engine.runner import run_recipe
    from stagewise.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    main_rank = is_main_process()  # under torchrun, say things once
    try:
        path = run_recipe(recipe, out=args.out, resume=args.resume, quiet=args.quiet)
    except RunInterrupted as exc:
        said, code = _how_stopped(exc)
        if main_rank:
            print(f"stagewise: {said}; continue with: {_resume_command(args, [args.recipe], exc.run_dir)}",
                  file=sys.stderr)
        return code
    except OSError as exc:  # e.g. the disk filled up: the run goes on from its last checkpoint once that is fixed
        run_dir = getattr(exc, "run_dir", None)
        if run_dir is not None:
            again = _resume_command(args, [args.recipe], run_dir)
            exc.continue_with = f"the run goes on from its last checkpoint with: {again}"  # type: ignore[attr-defined]
        raise
    if args.quiet and main_rank:  # the final table is left out: say where the run went
        print(path)
    return 0


def _how_stopped(exc: KeyboardInterrupt) -> tuple[str, int]:
    """What the command says of a run that ``exc`` stopped, and its exit status: as shells report a process the
    signal ended, 128 + 15 = 143 for a signal's stop (SIGTERM), so that a job script tells it from a finished
    run (0), a failed one (1) and Ctrl-C (128 + 2 = 130)."""
    return (str(exc), 143) if isinstance(exc, RunStopped) else ("interrupted", 130)


def _resume_command(args: argparse.Namespace, recipes: list[str], folder: Path) -> str:
    """The command that continues what ``args`` started (``args.command`` of ``recipes``) in ``folder``,
    launched as this one was (under torchrun, by torchrun with as many processes)."""
    from stagewise.engine.distributed import launcher

    return shlex.join([*launcher(), "stagewise", args.command, *recipes, "--resume", str(folder),
                       *set_args(args.overrides)])


def set_args(overrides: Sequence[str]) -> list[str]:
    """``--set`` overrides as command-line arguments: ``["--set", "a=1", "--set", "b=2"]``."""
    return [arg for override in overrides for arg in ("--set", override)]


def cmd_compare(args: argparse.Namespace) -> int:
    from stagewise.compare import compare_recipes
    from stagewise.engine.distributed import is_main_process
    from stagewise.engine.rundir import unused_folder

    out = args.resume or args.out or unused_folder(Path("runs/compare"))
    try:
        compare_recipes(args.recipes, args.overrides, out, quiet=args.quiet, resume=args.resume is not None)
    except KeyboardInterrupt as exc:  # a run's RunInterrupted too: compare --resume goes on with every run in `out`
        if not out.is_dir():  # stopped before the comparison wrote anything: nothing to continue
            raise
        said, code = _how_stopped(exc)
        if is_main_process():
            print(f"stagewise: {said}; continue with: {_resume_command(args, args.recipes, out)}", file=sys.stderr)
        return code
    except OSError as exc:  # e.g. the disk filled up: the comparison goes on once that is fixed
        if out.is_dir():
            again = _resume_command(args, args.recipes, out)
            exc.continue_with = f"its runs go on from their last checkpoints with: {again}"  # type: ignore[attr-defined]
        raise
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from stagewise.compare import comparison_table
    from stagewise.engine.rundir import read_number
    from stagewise.engine.runner import final_table
    from stagewise.verify import read_summary

    run_dirs = [run_dir for folder in args.run_dirs for run_dir in _runs_in(folder)]
    summaries = {str(run_dir): read_summary(run_dir) for run_dir in run_dirs}  # every one read before printing
    for summary in summaries.values():  # "nan" and "inf" as summary.json writes them: numbers again
        summary["metrics"] = {key: read_number(value) for key, value in summary["metrics"].items()}
    if len(summaries) == 1:
        print(final_table(summaries[str(run_dirs[0])], run_dirs[0]))
    else:
        print(comparison_table(summaries))
    return 0


def _runs_in(folder: Path) -> list[Path]:
    """``folder``, or where it is the OUT of ``stagewise compare`` (compare.json, no summary.json), its runs'
    folders in the order they were compared."""
    from stagewise.compare import COMPARE_JSON
    from stagewise.verify import load_json

    if (folder / "summary.json").exists() or not (folder / COMPARE_JSON).is_file():
        return [folder]
    table = load_json(folder / COMPARE_JSON, COMPARE_JSON)
    runs = table.get("runs") if isinstance(table, dict) else None
    if not isinstance(runs, dict):
        raise CheckpointError(f"{folder / COMPARE_JSON} has no 'runs' object: is {folder} the --out of a comparison?")
    return [folder / name for name in runs]


def cmd_verify(args: argparse.Namespace) -> int:
    from stagewise.verify import add_cpu_record, verify_report

    if args.add_cpu_record:
        kind, spread, named = add_cpu_record(Path(args.run_dir), Path(args.golden))
        print(f"verify: the run matches the record whose kind of CPU was not said exactly: named it {kind!r} in "
              f"{args.golden}" if named else f"verify: added the record for {kind!r} to {args.golden}; it differs "
              f"from the file's other records by at most {spread:.3g} (relative)")
        return 0

    report = verify_report(Path(args.run_dir), Path(args.golden))
    for line in report.differences:
        print(line)
    skipped = report.skipped
    note = (f" ({len(skipped)} wall-clock measurement(s) not compared: {', '.join(skipped)}; "
            "give one a tolerance in the golden file to compare it)") if skipped else ""
    if report.differences and report.names is not None:  # a rerun under another run.name still verifies
        note += "; the golden record is of run {!r}, this run is {!r}: is it another recipe's record?".format(
            *report.names)
    if report.cpu_note:  # the golden file has no record made on the run's kind of CPU
        note += f"; {report.cpu_note}"
    print(("verify: OK" if not report.differences else f"verify: {len(report.differences)} difference(s)") + note)
    return 1 if report.differences else 0


def cmd_export(args: argparse.Namespace) -> int:
    from stagewise.export import export_npz
    from stagewise.load import checkpoint_of, part_way_advice

    checkpoint = checkpoint_of(args.source)
    counts: dict[str, Any] = export_npz(checkpoint, args.out, args.exclude)
    artifacts = f"; artifacts: {', '.join(counts['artifacts'])}" if counts["artifacts"] else ""
    written = "replaced the earlier export" if counts["replaced"] else "wrote"
    print(f"{written} {args.out}: {counts['arrays']} arrays, {counts['parameters']} values{artifacts}")
    if counts["part_way"] is not None:  # e.g. the last.pt of a run that was stopped: not a trained model yet
        print(f"stagewise: note: {checkpoint} was written part-way through stage {counts['part_way']!r}, so these "
              f"are its weights at that point; {part_way_advice(checkpoint, 'export')}", file=sys.stderr)
    return 0


def _path(text: str) -> Path:
    """A path argument, ``~`` expanded (the shell does not in ``--out=~/x``). An empty one is
    refused: ``--resume ""`` must not start a new run, nor ``--out ""`` pick the default folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; give a folder or file name")
    return Path(text).expanduser()
