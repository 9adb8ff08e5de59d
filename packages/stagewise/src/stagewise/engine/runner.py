"""Run a recipe: build data and model, run each stage, write the run directory.

Everything that can fail on bad input (the recipe, the data, the model) is built before the
run directory is created, so a mistake writes nothing.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from stagewise.data.splits import DataError
from stagewise.data.vocab import Vocabulary
from stagewise.engine import distributed
from stagewise.engine.checkpoint import seed_everything, set_rng_state
from stagewise.engine.cpu import cpu_kind, device_kind
from stagewise.engine.failures import noted
from stagewise.engine.guards import RateLimitedWarnings, python_warnings_above_bars
from stagewise.engine.progress import showing_loading_bars
from stagewise.engine.resumable import options_problems
from stagewise.engine.resume import check_resumable, load_resume, refuse_damaged, restore_run
from stagewise.engine.rundir import RunDir, environment, file_in_the_way, unused_folder
from stagewise.engine.signals import StopSignal, stop_point, stopping_on_signals
from stagewise.engine.state import State, check_event_hooks
from stagewise.errors import CheckpointError, RunInterrupted, RunStopped, StagewiseError, TrainingError
from stagewise.events import Event
from stagewise.recipe import Recipe, RunOptions, data_path_keys
from stagewise.schema import as_table, build_dataclass
from stagewise.specs import StageSpec


def run_recipe(recipe: Recipe, out: str | Path | None = None, resume: str | Path | None = None,
               quiet: bool = False) -> Path:
    """Run every stage of ``recipe``; returns the run directory. ``resume`` continues a run in its
    own folder, so it excludes ``out``."""
    if out is not None and resume is not None:
        raise ValueError(f"run_recipe: give out or resume, not both (a resumed run goes on in {resume})")
    device = distributed.resolve_device(recipe)
    info = distributed.setup(device)  # the group stays until the process ends: a next run here (compare's) reuses it
    with _torch_settings(recipe.run):
        path = _run(recipe, device, info, out, None if resume is None else Path(resume), quiet)
    # every process leaves together: one that ended first could take the job down (torchrun stops the
    # others when one exits, a clean exit or a crash in torch's teardown) while rank 0 still writes the run
    distributed.barrier(info)
    return path


def _run(recipe: Recipe, device: torch.device, info: distributed.DistInfo, out: str | Path | None,
         resume: Path | None, quiet: bool) -> Path:
    """:func:`run_recipe` once the processes are set up: what can fail on bad input is built before
    the run directory, which then holds the stages' records."""
    run = recipe.run
    saved = load_resume(resume, recipe) if resume is not None else None
    seed_everything(run.seed)
    bars = not quiet and info.rank == 0 and sys.stderr.isatty()
    data = _load_data(recipe, shown=bars)
    # saved: only a resumed run's; checked before the model is built from it (another vocabulary would not fit)
    if resume is not None and saved is not None:
        _check_same_data(saved, data, resume)
    check_stages(recipe, data)
    check_event_hooks()
    model_options = _model_options(recipe, saved, resume)
    model = _build("model", recipe, lambda: recipe.model.component().from_recipe(model_options, data)).to(device)
    # before the run directory is touched: a damaged checkpoint leaves it as it was
    if resume is not None and saved is not None:
        check_resumable(saved, model, resume, recipe)
    path = distributed.main_process_choice(_run_folder(recipe, out, resume), info)
    run_dir = None
    try:
        with _resumable_in(path):
            if info.rank == 0:
                run_dir = _open_run_dir(recipe, data, path, resume is not None, saved)
            state = State(recipe=recipe, model=model, model_options=model_options, data=data, device=device,
                          dist=info, warnings=RateLimitedWarnings(silent=info.rank != 0), run_dir=run_dir,
                          quiet=quiet, resumed_from=resume)
            if resume is not None:
                first = restore_run(state, saved, path)
            else:  # said now, not only at the end: a long run's metrics and checkpoints are there from here on
                state.print(f"run {run.name!r} (seed {run.seed}): writing to {path}")
                first = 0
            with python_warnings_above_bars(bars), stopping_on_signals():  # the folder holds recipe.toml: resumable
                _run_stages(state, first, saved)
    finally:
        if run_dir is not None:
            run_dir.close()
    return path


@contextmanager
def _torch_settings(run: RunOptions) -> Iterator[None]:
    """The run's thread count and deterministic mode, for the run only: torch keeps them per process,
    and a next run here (compare's) with threads = 0 is to get torch's default, not this run's count."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    if run.threads:
        torch.set_num_threads(run.threads)
    torch.use_deterministic_algorithms(run.deterministic, warn_only=True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


@contextmanager
def _resumable_in(path: Path) -> Iterator[None]:
    """Once the run folder ``path`` holds its recipe.toml, a run stopped there can be resumed: Ctrl-C
    becomes RunInterrupted, which says how, a signal's stop RunStopped, and the file system's refusal (a
    full disk) names the folder (``exc.run_dir``), whose run resumes once that is fixed."""
    try:
        yield
    except KeyboardInterrupt as exc:
        if not (path / "recipe.toml").is_file():  # stopped as the folder was made: no run there to resume yet
            raise
        if isinstance(exc, StopSignal):
            raise RunStopped(path, exc.signal, exc.where) from None
        raise RunInterrupted(path) from None
    except OSError as exc:
        if (path / "recipe.toml").is_file():
            exc.run_dir = path  # type: ignore[attr-defined]  # read back with getattr by the CLI
        raise


def _open_run_dir(recipe: Recipe, data: Any, path: Path, resuming: bool, saved: dict[str, Any] | None) -> RunDir:
    """The main process's run directory. A run resumed from a checkpoint reopens its folder at the
    records the checkpoint had seen; a new run, or a resumed one killed before its first
    checkpoint (``saved`` is None: it starts over in its folder), writes the folder anew."""
    if saved is not None:
        return RunDir.reopen(path, saved["metrics_lines"])
    return RunDir.create(path, recipe.to_toml(), environment(), _data_files(data), again=resuming)


def _run_stages(state: State, first: int, saved: dict[str, Any] | None) -> None:
    """Run the stages from index ``first`` on between the run's events, then write the summary;
    the stage that ``saved`` (a mid-stage checkpoint) was taken in continues from it."""
    run = state.recipe.run
    with noted(f"in run {run.name!r}"):
        state.fire(Event.BEFORE_RUN)
    stages = state.recipe.stages
    for index in range(first, len(stages)):
        mid_stage = saved if saved is not None and index == saved["stage_index"] else None
        run_stage(state, index, stages[index], mid_stage)
        if index + 1 < len(stages):  # after the last one the run only writes its summary: a signal lets it finish
            stop_point(state.dist, f"after stage {stages[index].name!r} ended")
    gpu = device_kind(state.device)  # its numbers are the GPU's, whichever CPU drove it
    summary = {"recipe": run.name, "seed": run.seed, "cpu": cpu_kind(), **({"device": gpu} if gpu else {}),
               "stages": state.stage_results, "metrics": state.metrics}
    with noted(f"in run {run.name!r}"):
        state.fire(Event.AFTER_RUN, metrics=state.metrics)
    if state.run_dir is not None:
        state.run_dir.write_summary(summary)
        state.print(final_table(summary, state.run_dir.path))


def run_stage(state: State, index: int, spec: StageSpec, saved: dict[str, Any] | None) -> None:
    """Run one stage; ``saved`` is the checkpoint of this stage when resuming it mid-way."""
    _enter_stage(state, index, spec, saved)
    with noted(f"in stage {spec.name!r}", spec.use):  # a bug in the plugin code it calls: a grown model, hooks, stage
        if saved is not None:
            set_rng_state(saved["rng"])  # TrainLoop sets it again just before its first resumed step
        else:
            seed_everything(state.seed + index)  # each stage's randomness is independent of the others
            if spec.grow:
                grow_model(state, spec.grow)
        stage = spec.build()
        state.fire(Event.BEFORE_STAGE, stage=stage)
        state.stage_started = time.perf_counter() - (saved.get("stage_seconds", 0.0) if saved is not None else 0.0)
        metrics = _stage_metrics(state, stage, spec)
        _record_stage(state, spec, stage, metrics)
        state.fire(Event.AFTER_STAGE, stage=stage, metrics=metrics)  # before the checkpoint: hook records are kept
    state.save_checkpoint(done=True)


def _enter_stage(state: State, index: int, spec: StageSpec, saved: dict[str, Any] | None) -> None:
    """Start the state's per-stage fields afresh, so that nothing of the stage before (its step
    count, EMA target, loss terms) reaches this one; ``state.resume`` is what a resumed stage goes
    on from (TrainLoop reads it), until the stage ends."""
    state.stage_index, state.stage_name = index, spec.name
    state.epoch = state.step = state.epochs_run = 0
    state.target_model = None
    state.terms, state.term_weights = {}, {}
    state.resume = saved


def _record_stage(state: State, spec: StageSpec, stage: Any, metrics: dict[str, Any]) -> None:
    """Keep what the stage ended with: its results in summary.json's ``stages``, its metrics among
    the run's, a ``stage`` record in metrics.jsonl."""
    # a training stage flushed its warnings at each epoch's end; what is left the stage warned
    # outside an epoch: it belongs to this stage's metrics, not to the next stage's first epoch
    warned = state.warnings.flush(f"in stage {spec.name!r}")
    metrics.update({f"warnings/{kind}": n for kind, n in warned.items()})
    seconds = time.perf_counter() - state.stage_started
    state.resume = None  # the stage has ended: AFTER_STAGE hooks see no stage to resume
    state.stage_results[spec.name] = {"metrics": metrics, "epochs": state.epochs_run, "seconds": seconds,
                                      "measured": [k for k in metrics if k.rsplit("/", 1)[-1] in stage.measured]}
    state.metrics.update(metrics)
    state.log("stage", seconds=seconds, **metrics)


def _stage_metrics(state: State, stage: Any, spec: StageSpec) -> dict[str, Any]:
    """What ``stage`` reports; an allocation larger than the machine's memory is a TrainingError."""
    with _allocation_too_large(lambda gib: TrainingError(
            f"stage '{spec.name}' ({spec.use}) asked for {gib:.3g} GiB at once, more memory than this machine "
            f"has; lower its sizes (the run directory keeps the stages before it)")):
        return stage.run(state)


def check_stages(recipe: Recipe, data: Any) -> None:
    """Every stage's own checks (splits exist, required earlier stages), all reported at once."""
    problems = []
    for index, spec in enumerate(recipe.stages):
        with noted(f"checking stage {spec.name!r}", spec.use):
            problems += spec.build().check(recipe, index, data)
    if problems:
        raise recipe.error(list(dict.fromkeys(problems)))  # e.g. a data problem each training stage finds, once


def _run_folder(recipe: Recipe, out: str | Path | None, resume: Path | None) -> Path:
    """Where the run writes: a resumed run's own folder, else ``out``, else ``run.out/run.name``
    numbered past used folders (refused if ``run.out`` runs into a file)."""
    if resume is not None:
        return resume
    if out is not None:
        return Path(out)
    base = Path(recipe.run.out)
    blocking = file_in_the_way(base)
    if blocking is not None:
        raise recipe.error([f"run.out: {blocking} is a file, not a folder; set run.out to a folder "
                            f"(or pass --out)"])
    return unused_folder(base / recipe.run.name)


def _load_data(recipe: Recipe, shown: bool) -> Any:
    """Build the data, on a terminal saying so (like the progress bars), with a bar while a long step
    runs (:func:`~stagewise.engine.progress.loading_bar`): reading and tokenising a file of hundreds
    of MB takes a while before the first epoch's bar shows."""
    if shown:
        print(f"stagewise: loading the data ({recipe.data.use}) ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with showing_loading_bars(shown):
        data = _build("data", recipe, lambda: recipe.data.component().from_recipe(recipe.data.options,
                                                                                   seed=recipe.run.seed))
    if shown:
        print(f"stagewise: data loaded in {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)
    return data


def _build(table: str, recipe: Recipe, factory: Any) -> Any:
    """Build the data or the model; a bad option value or data file becomes a recipe error naming
    the table, or the key that names the file (``data.path``), and the recipe file."""
    use = getattr(recipe, table).use

    def too_large(gib: float) -> StagewiseError:
        return recipe.error([f"{table} ({use}): its options ask for {gib:.3g} GiB at once, more memory than this "
                             f"machine has; lower the sizes"])

    with noted(f"building the {table}", use):  # a bug, not a bad option or file: for the component's author
        with _allocation_too_large(too_large):
            try:
                return factory()
            except (ValueError, TypeError, KeyError) as exc:
                if isinstance(exc, StagewiseError) and not isinstance(exc, DataError):
                    raise
                keys = _file_keys(recipe, str(exc)) if table == "data" else []
                raise recipe.error([f"{', '.join(keys) or f'{table} ({use})'}: {exc}"]) from exc


def _file_keys(recipe: Recipe, message: str) -> list[str]:
    """The ``[data]`` path keys (``data.path``, ``data.images``, ...) whose file ``message`` names."""
    data = recipe.table["data"]
    return [f"data.{key}" for key in sorted(data_path_keys(data))
            if isinstance(data.get(key), str) and data[key] in message]


@contextmanager
def _allocation_too_large(error: Callable[[float], Exception]) -> Iterator[None]:
    """Raise ``error(gib)`` in place of a failed allocation larger than the machine's memory, so
    that the user learns which sizes to lower; any other RuntimeError passes."""
    try:
        yield
    except RuntimeError as exc:
        gib = _allocation_gib(exc)
        if gib is None:
            raise
        raise error(gib) from None


def _allocation_gib(exc: RuntimeError) -> float | None:
    """The GiB that a failed allocation of torch's CPU allocator asked for; None for another error."""
    asked = re.search(r"tried to allocate (\d+) bytes", str(exc))
    return None if asked is None else int(asked[1]) / 2**30


def grow_model(state: State, changes: dict[str, Any]) -> None:
    """Rebuild the model with changed options, copying every parameter whose name and shape
    still match (embedding, existing layers, head); the rest keep their fresh initialisation."""
    options = dataclasses.replace(state.model_options, **changes)
    model = state.recipe.model.component().from_recipe(options, state.data).to(state.device)
    old = state.model.state_dict()
    new = model.state_dict()
    copied = [k for k, v in new.items() if k in old and old[k].shape == v.shape]
    model.load_state_dict({**new, **{k: old[k] for k in copied}})
    state.model, state.model_options = model, options
    state.log("grow", changes=changes, copied=len(copied), new=len(new) - len(copied))


def _model_options(recipe: Recipe, saved: dict[str, Any] | None, resume: Path | None) -> Any:
    """The options the model is built with: the recipe's, or for a resumed run the checkpoint's, which
    differ from the recipe's once a stage has grown the model (``grow``), so its weights fit. They must
    be the recipe's at the checkpoint's stage: options that keep the weights' shapes (``n_head``,
    ``dropout``) would otherwise build another model and the run would silently diverge."""
    if resume is None or saved is None:  # saved: only a resumed run's
        return recipe.model.options
    problems: list[str] = []
    options = build_dataclass(type(recipe.model.options), saved["model_options"], "model_options", problems)
    refuse_damaged(problems, resume, recipe)
    if 0 <= saved["stage_index"] < len(recipe.stages):  # else no stage to compare with: check_resumable names it
        refuse_damaged(options_problems(as_table(options), as_table(recipe.model_options_at(saved["stage_index"])),
                                        "model_options"), resume, recipe)
    return options


def _check_same_data(saved: dict[str, Any], data: Any, path: Path) -> None:
    """CheckpointError unless the data gives the facts the checkpoint kept (split sizes, vocabulary size, ...) and
    the files the run wrote beside them (vocab.txt): a data file edited since the run started would train the rest
    of the run on other data, unsaid."""
    from stagewise.load import plain_info

    kept, now = saved.get("data_info"), plain_info(data.info)  # none in a checkpoint from before it was kept
    kept = kept if isinstance(kept, dict) else {}
    changes = [f"{key} {value!r} then, {now.get(key)!r} now" for key, value in kept.items() if now.get(key) != value]
    changes += [f"its {name} differs from the run's" for name, text in _data_files(data).items()
                if (path / name).is_file() and (path / name).read_text(encoding="utf-8") != text]
    if changes:
        raise CheckpointError(f"--resume {path}: the data is not what the run started with ({'; '.join(changes)}): "
                              f"a data file has changed since; restore it to continue the run, or run the recipe "
                              f"again with --out and a new folder")


def _data_files(data: Any) -> dict[str, str]:
    """Files the run directory keeps beside the model so that it can be used: a text corpus's
    vocabulary (``vocab.txt``), without which a language model's ids cannot be read."""
    vocab = data.info.get("vocab")
    return {"vocab.txt": vocab.to_text()} if isinstance(vocab, Vocabulary) else {}


def final_table(summary: dict[str, Any], path: Path) -> str:
    """The table printed at the end of a run: each stage's epochs and seconds, final metrics."""
    stage_width = _column_width(summary["stages"], 16)
    lines = [f"run {summary['recipe']!r} (seed {summary['seed']}) -> {path}", "",
             f"{'stage':<{stage_width}}{'epochs':>8}{'seconds':>10}"]
    for name, result in summary["stages"].items():
        lines.append(f"{name:<{stage_width}}{result['epochs']:>8}{result['seconds']:>10.1f}")
    metric_width = _column_width(summary["metrics"], 32)
    lines += ["", f"{'metric':<{metric_width}}{'value':>14}"]
    for key, value in summary["metrics"].items():
        shown = f"{value:.6g}" if isinstance(value, float) else str(value)
        lines.append(f"{key:<{metric_width}}{shown:>14}")
    return "\n".join(lines)


def _column_width(names: Iterable[str], least: int) -> int:
    """Wide enough that a long name (``phase2/phase2_token_mode_speedup_flops``) keeps a gap
    before its value, so every value stays in one column."""
    return max([least] + [len(name) + 2 for name in names])
