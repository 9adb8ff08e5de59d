"""Built-in event plugin: after a run, plot every epoch's train and validation loss.

Runs on ``Event.AFTER_RUN``. Writes ``RUN_DIR/plots/curves.png`` (x: epochs across all
stages, dotted lines at stage starts, named above the plot; a NaN or Inf epoch is a gap, counted
in the legend) when matplotlib is installed; without it, ``line_plot``
says so once per run, with the command that installs the ``[plots]`` extra.
"""

from __future__ import annotations

import json
from pathlib import Path

from stagewise.hookspecs import hookimpl
from stagewise.plots import line_plot

CURVES = ("train/loss", "val/loss")


@hookimpl
def stagewise_after_run(state):
    if state.run_dir is None:
        return
    from stagewise.engine.rundir import read_number  # imports torch: not when plugins load (`stagewise plugins`)

    epochs = epoch_records(state.run_dir.path / "metrics.jsonl")
    if not epochs:
        return
    # NaN and Inf as numbers again: metrics.jsonl holds them as "nan", "inf", which matplotlib drew as categories
    series = {key: ([i + 1 for i, r in enumerate(epochs) if key in r],
                    [read_number(r[key]) for r in epochs if key in r]) for key in CURVES}
    starts = [(i + 0.5, r["stage"]) for i, r in enumerate(epochs) if i == 0 or epochs[i - 1]["stage"] != r["stage"]]
    line_plot(state.run_dir.plot_path("curves.png"), {k: v for k, v in series.items() if v[0]},
              title=f"{state.recipe.run.name}: loss per epoch", xlabel="epoch (all stages)", ylabel="loss",
              vlines=starts)


def epoch_records(path: Path) -> list[dict]:
    """The ``epoch`` records of ``path``, read a line at a time: a long run's file (a step record
    every ``log_every_n_steps`` steps) can be far larger than memory, its epoch records are few."""
    with open(path, encoding="utf-8") as lines:
        return [r for r in map(json.loads, lines) if r["event"] == "epoch"]
