"""Built-in event plugin: after a run, plot every epoch's train and validation loss, and accuracy.

Runs on ``Event.AFTER_RUN``. Writes ``RUN_DIR/plots/curves.png`` (x: epochs across all
stages, dotted lines at stage starts, named above the plot, where each line breaks; a NaN or Inf
epoch is a gap, counted in the legend; a log y axis when the losses span a factor of 10) and, for a run
whose epochs record ``val/acc`` (or ``train/acc``), ``accuracy.png`` alike on a linear axis, when
matplotlib is installed; without it, ``line_plot`` says so once per run, with the command that
installs the ``[plots]`` extra.
"""

from __future__ import annotations

import json
from pathlib import Path

from stagewise.hookspecs import hookimpl
from stagewise.plots import line_plot, log_scale_reads_better

# each plot: its file, what its y axis shows, and the epoch metrics it draws (those the run logged)
PLOTS = (("curves.png", "loss", ("train/loss", "val/loss")), ("accuracy.png", "accuracy", ("train/acc", "val/acc")))


@hookimpl
def stagewise_after_run(state):
    if state.run_dir is None:
        return
    epochs = epoch_records(state.run_dir.path / "metrics.jsonl")
    if not epochs:
        return
    starts = [(i + 0.5, r["stage"]) for i, r in enumerate(epochs) if i == 0 or epochs[i - 1]["stage"] != r["stage"]]
    for name, what, keys in PLOTS:
        series = {key: stage_series(epochs, key) for key in keys}
        series = {key: xy for key, xy in series.items() if xy[0]}  # no empty val/loss entry in the legend
        if series:
            line_plot(state.run_dir.plot_path(name), series, title=f"{state.recipe.run.name}: {what} per epoch",
                      xlabel="epoch (all stages)", ylabel=what, logy=what == "loss" and log_scale_reads_better(series),
                      vlines=starts)


def stage_series(epochs: list[dict], key: str) -> tuple[list[float], list[float | None]]:
    """``key`` of the ``epochs`` that have it, by epoch number across stages, for ``line_plot``: a
    None y breaks the line between two stages' points, as they are different models or objectives."""
    from stagewise.engine.rundir import read_number  # imports torch: not when plugins load (`stagewise plugins`)

    xs: list[float] = []
    ys: list[float | None] = []
    stage = None
    for x, record in enumerate(epochs, start=1):
        if key not in record:
            continue
        if stage is not None and record["stage"] != stage:
            xs.append(x - 0.5)  # between the two points: at this stage's start if this is its first epoch
            ys.append(None)
        # NaN and Inf as numbers again: metrics.jsonl holds them as "nan", "inf", which matplotlib drew as categories
        xs.append(x)
        ys.append(read_number(record[key]))
        stage = record["stage"]
    return xs, ys


def epoch_records(path: Path) -> list[dict]:
    """The ``epoch`` records of ``path``, read a line at a time: a long run's file (a step record
    every ``log_every_n_steps`` steps) can be far larger than memory, its epoch records are few."""
    with open(path, encoding="utf-8") as lines:
        return [r for r in map(json.loads, lines) if r["event"] == "epoch"]
