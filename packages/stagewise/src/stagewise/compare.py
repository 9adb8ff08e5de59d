"""Run a baseline and a method (or any recipes) in one process on the same data and seed.

Baselines are run, not typed in: ``compare_recipes`` refuses recipes whose data tables or
seeds differ, whose run directories ``OUT/<run name>`` would be one folder on macOS or Windows (names
differing only in case or Unicode normalisation), or one of which already holds files (before running any),
runs each there, prints one table of final metrics side by side and writes ``OUT/compare.json``
and, with matplotlib, ``OUT/compare.png``: each run's ``val/loss`` per epoch. A comparison that
was stopped goes on with ``resume``: as ``stagewise run --resume`` does, run by run.
"""

from __future__ import annotations

import fnmatch
import json
import math
import shlex
from pathlib import Path
from typing import Any

from stagewise.engine.atomic import TEMP_GLOB, remove_temp_files
from stagewise.engine.distributed import group_info, is_main_process
from stagewise.engine.resume import check_same_recipe
from stagewise.engine.rundir import empty_folder, holds_files, read_number, write_json_atomic
from stagewise.engine.signals import StopSignal, stop_point, stopping_on_signals
from stagewise.errors import CheckpointError, ConfigError, RunStopped
from stagewise.names import alike, how_alike, same_file_key
from stagewise.plots import line_plot, log_scale_reads_better
from stagewise.recipe import Recipe, load_recipe, read_recipe_table
from stagewise.specs import LossSpec, StageSpec
from stagewise.tomlwrite import toml_value

COMPARE_JSON = "compare.json"  # the table, beside the runs' folders in OUT
COMPARE_PNG = "compare.png"  # the runs' val/loss curves, there too


def compare_recipes(names: list[str], overrides: list[str], out: Path, quiet: bool = False,
                    resume: bool = False) -> dict[str, Any]:
    """``resume``: ``out`` holds a comparison that was stopped; each run that holds files is
    resumed (a finished one only has its summary rewritten), the others start."""
    recipes = [load_recipe(name, own) for name, own in zip(names, overrides_by_recipe(names, overrides), strict=True)]
    check_comparable(recipes)
    if resume and not out.is_dir():  # a mistyped folder must not quietly start a new comparison
        raise CheckpointError(f"--resume {out}: no such folder; give the --out folder of the comparison to continue")
    started = {recipe.run.name: _started(out / recipe.run.name, recipe, resume) for recipe in recipes}
    if resume:  # a kill as compare.json was written left its temp file; the table is written anew below
        remove_temp_files(out)
    runs = _run_all(recipes, started, out, quiet)
    if is_main_process():  # under torchrun, rank 0 writes and says it, as it does each run's folder
        write_json_atomic(out / COMPARE_JSON, {"runs": runs})
        drawn = _plot_comparison(out / COMPARE_PNG, runs)
        print(f"{comparison_table(runs)}\n\n-> {out / COMPARE_JSON}" + (f"\n-> {out / COMPARE_PNG}" if drawn else ""))
    return runs


def _run_all(recipes: list[Recipe], started: dict[str, bool], out: Path, quiet: bool) -> dict[str, Any]:
    """Run (or resume, where ``started``) each recipe in ``out``; each run's folder and final metrics. A signal's
    request to stop (:mod:`stagewise.engine.signals`) is held across the runs: a run lets one in its last stage
    finish, and the comparison then stops before the next run starts (RunStopped naming ``out``)."""
    from stagewise.engine.runner import run_recipe

    runs: dict[str, Any] = {}
    try:
        with stopping_on_signals():
            for recipe in recipes:
                if runs:  # every process of a torchrun job, as it left the run before
                    stop_point(group_info(), f"after run {list(runs)[-1]!r} ended")
                folder = out / recipe.run.name
                run_dir = (run_recipe(recipe, resume=folder, quiet=quiet) if started[recipe.run.name]
                           else run_recipe(recipe, out=folder, quiet=quiet))
                metrics = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))["metrics"]
                # a NaN or Inf metric is written "nan"/"inf": a number still, not a metric the run lacks
                runs[recipe.run.name] = {"run_dir": str(run_dir),
                                         "metrics": {k: read_number(v) for k, v in metrics.items()}}
    except StopSignal as exc:  # between two runs: a stop within one is its RunStopped
        raise RunStopped(out, exc.signal, exc.where) from None
    return runs


def _plot_comparison(path: Path, runs: dict[str, Any]) -> bool:
    """Draw each run's ``val/loss`` per epoch to ``path``, a line (a colour) per run, broken at the run's
    own stage starts; False if no run has one or it is not drawn. Not ``train/loss``: that is each
    recipe's own objective (its auxiliary terms, or mined tokens only), so runs' lines would not compare."""
    from stagewise.builtins.curves import epoch_records, stage_series

    series = {name: stage_series(epoch_records(Path(run["run_dir"]) / "metrics.jsonl"), "val/loss")
              for name, run in runs.items()}
    series = {name: xy for name, xy in series.items() if xy[0]}  # a run without validation has no line
    return bool(series) and line_plot(path, series, title=f"{' vs '.join(runs)}: val/loss per epoch",
                                      xlabel="epoch (all stages)", ylabel="val/loss",
                                      logy=log_scale_reads_better(series))


def _started(folder: Path, recipe: Recipe, resume: bool) -> bool:
    """Whether ``recipe``'s run in ``folder`` has begun; checked for every recipe before the first
    runs. Without ``resume`` a folder holding files is refused; with it, one holding another recipe's run."""
    if not (resume and folder.is_dir() and holds_files(folder)):
        empty_folder(folder, f"pass --resume {folder.parent} to continue that comparison, or --out with a new folder")
        return False
    if not (folder / "recipe.toml").is_file():
        raise CheckpointError(f"--resume {folder.parent}: {folder} holds files but no recipe.toml, so it is not a "
                              f"run of {recipe.run.name!r}; move it away, or pass --out with a new folder")
    check_same_recipe(folder, recipe)
    return True


def overrides_by_recipe(names: list[str], overrides: list[str]) -> list[list[str]]:
    """Each recipe's share of ``overrides``: one that sets ``stages.NAME.…`` goes only to the
    recipes that have a stage NAME (a baseline's ``train`` and a method's ``phase1`` can both be
    shortened in one command), one that sets ``stages.NAME.losses.TERM.…`` only to those whose
    stage NAME has a term TERM (a method's auxiliary term beside a baseline without it), and is
    said once; one that no recipe matches goes to all, whose errors then name it."""
    stages = [_stage_terms(name) for name in names]
    shares: list[list[str]] = [[] for _ in names]
    for item in overrides:
        target = _override_target(item)
        having = [i for i, own in enumerate(stages) if target is not None and _has(own, *target)]
        if target is not None and having and len(having) < len(names) and is_main_process():  # said once under torchrun
            others = ", ".join(names[i] for i in range(len(names)) if i not in having)
            stage, term = target
            lacking = f"no stage named {stage!r}" if term is None else f"no loss term {term!r} in stage {stage!r}"
            print(f"compare: --set {item} applies to {', '.join(names[i] for i in having)} only ({others}: {lacking})")
        for i in having or range(len(names)):
            shares[i].append(item)
    return shares


def _override_target(item: str) -> tuple[str, str | None] | None:
    """The stage (and loss term) a ``--set`` addresses: ``stages.NAME[.losses.TERM].KEY``, or one
    that removes, ``~stages.NAME[.losses.TERM][.KEY]``, the stage or term itself too."""
    removing = item.startswith("~")
    parts = item.removeprefix("~").partition("=")[0].strip().split(".")
    least = 2 if removing else 3  # parts up to the stage's name, and a key unless it removes the stage
    if len(parts) < least or parts[0] != "stages":
        return None
    return parts[1], parts[3] if len(parts) >= least + 2 and parts[2] == "losses" else None


def _has(stages: dict[str, set[str]], stage: str, term: str | None) -> bool:
    return stage in stages and (term is None or term in stages[stage])


def _stage_terms(name: str) -> dict[str, set[str]]:
    """Each stage's name in a recipe file, with its loss terms' names, as ``--set`` addresses them."""
    raw, _ = read_recipe_table(name)
    stages = raw.get("stages")
    if not isinstance(stages, list):
        return {}
    return {StageSpec.item_name(table): _term_names(table.get("losses")) for table in stages if isinstance(table, dict)}


def _term_names(losses: Any) -> set[str]:
    return {LossSpec.item_name(t) for t in losses if isinstance(t, dict)} if isinstance(losses, list) else set()


def check_comparable(recipes: list[Recipe]) -> None:
    first = recipes[0]
    problems = _run_folder_problems(recipes)
    for other in recipes[1:]:
        if other.run.seed != first.run.seed:
            problems.append(f"{other.source}: run.seed {other.run.seed} differs from {first.run.seed} "
                            f"in {first.source}; compare on the same seed (--set run.seed=N sets all)")
        if other.table["data"] != first.table["data"]:
            a, b = first.table["data"], other.table["data"]
            keys = sorted(k for k in a.keys() | b.keys() if a.get(k, "unset") != b.get(k, "unset"))
            problems.append(f"{other.source}: [data] differs from {first.source} in {', '.join(keys)}; compare on "
                            f"the same data: add {_aligning_sets(keys, a, b)} (a --set of data.* applies to every "
                            f"recipe compared)")
    if problems:
        raise ConfigError(problems, "compare")


def _run_folder_problems(recipes: list[Recipe]) -> list[str]:
    """Each recipe runs in ``OUT/<run.name>``: two runs must not share that folder on any file system
    (a copy of OUT on macOS or Windows too), nor may one take the name of the file compare writes there."""
    used: dict[str, list[str]] = {}  # run name -> the recipes that give it
    for recipe in recipes:
        used.setdefault(recipe.run.name, []).append(recipe.source)
    rename = "rename one in its recipe file (a --set of run.name applies to every recipe compared)"
    problems = [f"{sources[1]}: run.name {name!r} is used twice; names must differ: {rename}"
                for name, sources in used.items() if len(sources) > 1]
    problems += [f"run.name {' and '.join(f'{name!r} ({used[name][0]})' for name in spellings)}, the runs' folders "
                 f"in OUT, {how_alike(spellings, 'folder')}; {rename}" for spellings in alike(used)]
    problems += [f"{sources[0]}: run.name {name!r} is the name of {what} in OUT; rename the run in its recipe file"
                 for name, sources in used.items() if (what := _compare_file(name))]
    return problems


def _compare_file(name: str) -> str | None:
    """What of compare's own a run folder named ``name`` would be, where case is ignored too; None if nothing."""
    if same_file_key(name) == same_file_key(COMPARE_JSON):
        return "the table compare writes"
    if same_file_key(name) == same_file_key(COMPARE_PNG):
        return "the figure compare draws"
    if fnmatch.fnmatchcase(name.casefold(), TEMP_GLOB):
        return "a temp file of an interrupted write, which compare --resume deletes"
    return None


def _aligning_sets(keys: list[str], first: dict[str, Any], other: dict[str, Any]) -> str:
    """The ``--set`` options that give both ``[data]`` tables the same ``keys``: the first recipe's
    values, or the other's where the first leaves a key unset (no --set unsets one)."""
    values = {key: first[key] if key in first else other[key] for key in keys}
    return " ".join(f"--set {shlex.quote(f'data.{key}={toml_value(value)}')}" for key, value in values.items())


def comparison_table(runs: dict[str, Any]) -> str:
    """The runs' final metrics side by side, then each later run's change against the first (the
    baseline), in % of the first's value: what a reader would otherwise divide by hand."""
    names = list(runs)
    keys: list[str] = []
    for run in runs.values():
        keys += [k for k, v in run["metrics"].items() if isinstance(v, int | float) and k not in keys]
    values = [[runs[n]["metrics"].get(key) for n in names] for key in keys]
    header = ["metric", *names, *(f"{n} vs {names[0]}" for n in names[1:])]
    rows = [header] + [[key, *map(_cell, row), *(_change(row[0], v) for v in row[1:])] for key, row in
                       zip(keys, values, strict=True)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(row[0].ljust(widths[0] + 2) + "".join(f"{c:>{w + 2}}" for c, w in zip(row[1:], widths[1:],
                                                                                           strict=True))
                     for row in rows)


def _change(first: Any, other: Any) -> str:
    """``other`` against ``first`` in %, for numbers (not flags) where ``first`` is not 0; else '-'."""
    if not (_number(first) and _number(other)) or first == 0:
        return "-"
    return f"{100 * (other - first) / abs(first):+.2f}%"


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _cell(value: float | None) -> str:
    """As the run's final table shows it: True/False, not 1/0; '-' for a metric the run lacks."""
    return "-" if value is None else str(value) if isinstance(value, bool) else f"{value:.6g}"
