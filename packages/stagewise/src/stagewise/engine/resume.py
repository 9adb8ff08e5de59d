"""What ``stagewise run --resume RUN`` continues from: the run's last checkpoint, checked
against the code and the recipe it is resumed with, and the state it puts back. ``stagewise compare
--resume`` checks each of its runs' recipes here too (:func:`check_same_recipe`)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import torch

from stagewise.engine.checkpoint import RESUME_KEYS, load_checkpoint
from stagewise.engine.loop import position_problems
from stagewise.engine.resumable import kind, number_problems, plain_problems, rng_problems, same_types, tensors_problems
from stagewise.engine.rundir import holds_files
from stagewise.engine.state import State
from stagewise.errors import CheckpointError, ConfigError
from stagewise.plugins import versions
from stagewise.recipe import Recipe, recipe_from_table
from stagewise.specs import StageSpec
from stagewise.tomlwrite import toml_value


def restore_run(state: State, saved: dict[str, Any] | None, path: Path) -> int:
    """Put a resumed run's model, artifacts and results back from ``saved`` (None: the run has no
    checkpoint yet, so it starts over); returns the index of the first stage to run."""
    if saved is None:
        state.print(f"{path} has no checkpoint yet: running it again from the start")
        return 0
    state.model.load_state_dict(saved["model"])
    state.artifacts, state.metrics = saved["artifacts"], saved["metrics"]
    state.routers = saved.get("routers", {})  # a checkpoint written before routers were kept has none
    state.stage_results = saved["stage_results"]
    first = saved["stage_index"] + (1 if saved["stage_done"] else 0)
    n = len(state.recipe.stages)
    state.print(f"resuming {path} at stage {first + 1}/{n}{_within_stage(saved)}" if first < n
                else f"{path} has finished all {n} stages: nothing to resume")
    return first


def check_resumable(saved: dict[str, Any], model: torch.nn.Module, path: Path, recipe: Recipe) -> None:
    """CheckpointError unless what the run's last.pt holds has the types and shapes a run writes there,
    checked before anything of it is put back or the run directory ``path`` is touched: the weights
    fit ``model`` (built from the checkpoint's model options), the RNG states, the stage, the results
    and, for a training stage's mid-stage checkpoint, its loop position (the rest is the loop's to
    check, against the optimizer it builds: :meth:`TrainLoop._resume_problems`)."""
    index, name, stages = saved["stage_index"], saved["stage_name"], recipe.stages
    problems = tensors_problems(saved["model"], model.state_dict(), "model") + rng_problems(saved["rng"])
    if not (0 <= index < len(stages) and stages[index].name == name):
        problems.append(f"stage_index, stage_name: {index}, {name!r} is no stage of this recipe")
    problems += plain_problems(saved["metrics"], "metrics") + _results_problems(saved["stage_results"])
    problems += number_problems(saved.get("stage_seconds", 0.0), "stage_seconds")
    if not isinstance(saved.get("routers", {}), dict):
        problems.append(f"routers: {kind(saved['routers'])}, expected a table of routers by name")
    if not saved["stage_done"] and "loop" in saved:  # a training stage's: where it resumes is said before it runs
        problems += position_problems(saved["loop"]) + same_types(saved.get("step"), 0, "step")
    refuse_damaged(problems, path, recipe)


def refuse_damaged(problems: list[str], path: Path, recipe: Recipe) -> None:
    """CheckpointError naming what is wrong inside the last.pt of the run at ``path`` (the first few
    problems, each as KEY.PATH: what), and what to do instead, unless ``problems`` is empty."""
    if problems:
        raise CheckpointError(f"{path / 'checkpoints' / 'last.pt'}: a damaged stagewise checkpoint: what it holds "
                              f"is not what a run writes there: {_first_few(problems, '; ', '; and')}. "
                              f"{_damaged_last_advice(path, recipe)}")


def _results_problems(results: dict[str, Any]) -> list[str]:
    """Each stage result (summary.json's ``stages``) that is not as :func:`_record_stage` writes it."""
    problems = []
    for name, result in results.items():
        where = f"stage_results.{name}"
        if not isinstance(result, dict) or result.keys() != {"metrics", "epochs", "seconds", "measured"}:
            problems.append(f"{where}: expected a table of metrics, epochs, seconds, measured")
            continue
        problems += plain_problems(result, where) + number_problems(result["seconds"], f"{where}.seconds")
        problems += [f"{where}.{key}: expected a {kind.__name__}" for key, kind in
                     (("metrics", dict), ("epochs", int), ("measured", list)) if type(result[key]) is not kind]
    return problems


def _within_stage(saved: dict[str, Any]) -> str:
    """Where in its stage a mid-stage training checkpoint resumes (epochs 1-based, as the progress
    bar counts them): ", epoch 2 after step 13", or ", start of epoch 3"; "" for a stage's start."""
    loop = saved.get("loop") if not saved["stage_done"] else None  # TrainLoop's position
    if loop is None:
        return ""
    epoch = loop["epoch"] + 1
    return f", epoch {epoch} after step {saved['step']}" if loop["batch"] else f", start of epoch {epoch}"


def load_resume(path: Path, recipe: Recipe) -> dict[str, Any] | None:
    """The checkpoint to continue from; None for a run killed before its first checkpoint, which
    has nothing to continue from and starts over in its folder (same recipe only), or killed as
    its folder was made (it holds nothing, or only the temp file of recipe.toml)."""
    checkpoints = path / "checkpoints"
    if path.is_dir() and not holds_files(path):
        return None
    if not (path / "recipe.toml").is_file():
        problem = ("does not exist" if not path.exists() else "is a file" if not path.is_dir()
                   else "is not a run directory (it has no recipe.toml)")
        raise CheckpointError(f"--resume {path}: {problem}; give the run directory of the run to continue "
                              f"(the folder that holds its recipe.toml, checkpoints/ and metrics.jsonl)")
    if not any(checkpoints.glob("*.pt")):  # a temp file a kill left behind is not a checkpoint
        check_same_recipe(path, recipe)
        return None
    last = checkpoints / "last.pt"
    if not last.exists():
        raise CheckpointError(f"--resume {path}: there is no {last}, only the checkpoints of finished stages; "
                              f"copy {_latest_stage_checkpoint(checkpoints, recipe)} over {last} to continue after "
                              f"that stage")
    saved = load_checkpoint(last, RESUME_KEYS, _damaged_last_advice(path, recipe))
    _check_same_versions(saved.get("versions"), last, path, recipe)  # first: another version reads a recipe otherwise
    if saved["recipe"] != recipe.table:
        _check_same_reading(saved["recipe"], last)
        raise _recipe_differs(path, saved["recipe"], recipe.table)
    return saved


def _other_code(restore: str = "") -> str:
    """Why a checkpoint other code wrote is not resumed, and what to do instead (``restore``: the command that
    installs the code that started the run, where known)."""
    return ("a run continued by other code may end with the numbers of neither code's uninterrupted run. Finish it "
            f"with the code that started it{f' ({restore})' if restore else ''}, or run the recipe again with --out "
            "and a new folder")


def _check_same_versions(written: Any, last: Path, path: Path, recipe: Recipe) -> None:
    """CheckpointError unless the checkpoint ``last`` of the run at ``path`` was written by the versions
    of stagewise and of its plugins installed now (``written``: its record of them, None in one an earlier
    stagewise wrote). A plugin installed or gone since does not count: its names, where the recipe
    uses them, are checked with the recipe."""
    if written is None:
        raise CheckpointError(f"{last}: written by an earlier stagewise, which did not record its version in "
                              f"checkpoints; {_other_code()}")
    if not (isinstance(written, dict) and all(isinstance(v, str) for v in [*written, *written.values()])):
        refuse_damaged([f"versions: {kind(written)}, expected a table of distributions and their versions"],
                       path, recipe)
    now = versions()
    changed = sorted(d for d in written.keys() & now.keys() if written[d] != now[d])
    if changed:
        raise CheckpointError(f"{last}: written with {', '.join(f'{d} {written[d]}' for d in changed)}, not the "
                              f"{', '.join(f'{d} {now[d]}' for d in changed)} installed now; "
                              f"{_other_code('pip install ' + ' '.join(f'{d}=={written[d]}' for d in changed))}")


def check_same_recipe(path: Path, recipe: Recipe) -> None:
    """CheckpointError naming each changed key unless the run directory ``path`` was started with
    ``recipe`` (its recipe.toml, as the run wrote it and as this code reads it)."""
    file = path / "recipe.toml"
    try:
        started = file.read_text(encoding="utf-8")
        if started != recipe.to_toml():  # compared as this code reads it: a key added since takes its default
            table = _resolved(tomllib.loads(started), file)
            if table != recipe.table:
                raise _recipe_differs(path, table, recipe.table)
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:  # damaged since: no recipe to check against
        raise CheckpointError(f"{file}: the recipe this run started with cannot be read ({exc}), so the run cannot "
                              f"be continued; run the recipe again with --out and a new folder") from None


def _check_same_reading(table: dict[str, Any], last: Path) -> None:
    """CheckpointError where this code reads the recipe ``table`` that the checkpoint ``last`` saved otherwise
    than the code that wrote it did: other code of the same version numbers (between two releases), which
    the version check lets through; the advice to resume with the recipe the run saved would fail again."""
    started = _resolved(table, last)
    if started != table:
        changes = _first_few(_changes(table, started, ""), ", ", " and")
        raise CheckpointError(f"{last}: written by other code of the same versions: this code reads the recipe "
                              f"it saved otherwise ({changes}); {_other_code()}")


def _resolved(table: dict[str, Any], file: Path) -> dict[str, Any]:
    """The recipe ``table`` a run saved in ``file`` (its recipe.toml or a checkpoint) as this code reads it,
    defaults filled in; CheckpointError where it no longer loads (a key only another version has)."""
    try:
        return recipe_from_table(table, str(file), []).table
    except ConfigError as exc:
        raise CheckpointError(f"{file}: the recipe this run started with does not load with the stagewise and plugins "
                              f"installed now ({_first_few(exc.problems, '; ', '; and')}): another version started "
                              f"it, or a plugin it used is gone; run the recipe again with --out and a new folder"
                              ) from None


def _damaged_last_advice(path: Path, recipe: Recipe) -> str:
    """What to do when the run's last.pt cannot be read: continue after the last stage that finished,
    naming its checkpoint; or, before any stage has finished, run the recipe again elsewhere (``--out``
    refuses the run's folder, which is not empty)."""
    checkpoints = path / "checkpoints"
    if _last_finished(checkpoints, recipe) is None:
        return (f"No stage of this run has finished, so no other checkpoint can continue it: run the recipe again "
                f"with --out and a new folder (or delete {path} first)")
    return (f"Copy {_latest_stage_checkpoint(checkpoints, recipe)} over {checkpoints / 'last.pt'} to continue after "
            f"that stage, or run the recipe again with --out and a new folder")


def _last_finished(checkpoints: Path, recipe: Recipe) -> StageSpec | None:
    """The last stage, in recipe order, whose checkpoint is in ``checkpoints``; None if none is."""
    return next((s for s in reversed(recipe.stages) if (checkpoints / f"{s.checkpoint}.pt").exists()), None)


def _latest_stage_checkpoint(checkpoints: Path, recipe: Recipe) -> str:
    """The checkpoint of the last stage, in recipe order, that has one, as the advice names it."""
    spec = _last_finished(checkpoints, recipe)
    return ("the latest checkpoints/<stage>.pt" if spec is None
            else f"{checkpoints / f'{spec.checkpoint}.pt'} (stage {spec.name!r}, the last one that finished)")


def _recipe_differs(path: Path, started: dict[str, Any], table: dict[str, Any]) -> CheckpointError:
    """The refusal of a recipe (``table``) other than the one the run at ``path`` started with,
    naming the first few changed keys and the command that resumes it."""
    return CheckpointError(
        f"{path}: the recipe differs from the one this run started with: "
        f"{_first_few(_changes(started, table, ''), ', ', ' and')}. Resume with the --set "
        f"overrides it started with, or with the recipe it saved: stagewise run {path / 'recipe.toml'} "
        f"--resume {path}")


_SHOWN = 5  # the problems and recipe changes an error lists; the rest are counted
_UNSET = object()


def _first_few(items: list[str], separator: str, and_: str) -> str:
    """The first :data:`_SHOWN` of ``items`` joined by ``separator``, then ``{and_} N more`` for the rest."""
    rest = f"{and_} {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return separator.join(items[:_SHOWN]) + rest


def _changes(started: Any, now: Any, key: str) -> list[str]:
    """Each recipe key whose value changed, as --set names it: ``stages.phase1.lr = 0.5 (the run
    started with 0.01)``; stages and loss terms by name, in order."""
    if isinstance(started, dict) and isinstance(now, dict):
        return [change for k in dict.fromkeys([*started, *now])
                for change in _changes(started.get(k, _UNSET), now.get(k, _UNSET), f"{key}.{k}".lstrip("."))]
    if _names(started) is not None and _names(now) is not None:  # [[stages]], losses
        if _names(started) != _names(now):  # not their every key: the names say enough
            return [f"{key} names {_shown(_names(now))} (the run started with {_shown(_names(started))})"]
        return [change for a, b in zip(started, now, strict=True) for change in _changes(a, b, f"{key}.{a['name']}")]
    if started == now:
        return []
    return [f"{key} = {_shown(now)} (the run started with {_shown(started)})"]


def _names(value: Any) -> list[str] | None:
    """The names of a list of named tables; None for any other value."""
    named = isinstance(value, list) and all(isinstance(v, dict) and "name" in v for v in value)
    return [v["name"] for v in value] if named else None


def _shown(value: Any) -> str:
    return "unset" if value is _UNSET else toml_value(value)
