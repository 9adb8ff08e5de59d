"""Progress bars of the work outside training (the post-hoc fit, the evaluation passes), through
core's state.progress: shown where core shows its training bar, nowhere else, never moving a number."""

from __future__ import annotations

import io
import json
import sys

from conftest import run_tiny
from tqdm import tqdm

import stagewise.engine.progress


class Terminal(io.StringIO):
    """A stderr that says it is a terminal and keeps what was written to it."""

    def isatty(self) -> bool:
        return True


def test_fit_and_evaluation_show_bars_of_their_length_on_a_terminal_and_move_no_metric(monkeypatch, tmp_path,
                                                                                      tiny_run):
    bars = []

    class Recording(tqdm):
        def __iter__(self):
            count = 0
            for item in super().__iter__():
                count += 1
                yield item
            bars.append((self.desc, self.total, count))

    monkeypatch.setattr(stagewise.engine.progress, "tqdm", Recording)  # every bar of a run is made there
    monkeypatch.setattr(sys, "stderr", Terminal())
    run = run_tiny(tmp_path / "run", quiet=False)
    # core's bars (training epochs, evaluated splits) are tested in core
    ours = [desc for desc, _, _ in bars if "epoch" not in desc and "evaluating" not in desc]
    assert ours == ["forward: test", "linearity: fit", "linearity: valid"]
    assert all(total == count for _, total, count in bars), bars  # fit: fit_steps; a split: its batches
    assert "linearity: fit" in sys.stderr.getvalue()
    assert json.loads((run / "summary.json").read_text())["metrics"] == \
        json.loads((tiny_run / "summary.json").read_text())["metrics"]


def test_a_quiet_run_shows_no_bar_on_a_terminal(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "stderr", Terminal())
    run_tiny(tmp_path / "run")
    assert "%|" not in sys.stderr.getvalue()  # no bar, core's or ours (warnings still print)
