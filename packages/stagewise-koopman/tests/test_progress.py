"""Progress bars of the work outside training (the post-hoc fit, the evaluation passes): shown
where core shows its training bar, nowhere else, and never moving a number."""

from __future__ import annotations

import io
import json
import sys
from types import SimpleNamespace

import pytest
import stagewise_koopman.progress
from conftest import run_tiny
from stagewise_koopman.progress import show_bar
from tqdm import tqdm


class Terminal(io.StringIO):
    """A stderr that says it is a terminal and keeps what was written to it."""

    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("quiet", "is_main", "terminal", "shown"), [
    (False, True, True, True),
    (True, True, True, False),  # --quiet
    (False, False, True, False),  # another torchrun process
    (False, True, False, False),  # a log file, a pipe, a test
])
def test_bars_follow_the_rule_of_cores_training_bar(monkeypatch, quiet, is_main, terminal, shown):
    monkeypatch.setattr(sys, "stderr", Terminal() if terminal else io.StringIO())
    assert show_bar(SimpleNamespace(quiet=quiet, is_main=is_main)) == shown


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

    monkeypatch.setattr(stagewise_koopman.progress, "tqdm", Recording)
    monkeypatch.setattr(sys, "stderr", Terminal())
    run = run_tiny(tmp_path / "run", quiet=False)
    assert [desc for desc, _, _ in bars] == ["forward test", "linearity fit", "linearity valid"]
    assert all(total == count for _, total, count in bars), bars  # fit: fit_steps; a split: its batches
    assert "linearity fit" in sys.stderr.getvalue()
    assert json.loads((run / "summary.json").read_text())["metrics"] == \
        json.loads((tiny_run / "summary.json").read_text())["metrics"]


def test_a_quiet_run_shows_no_bar_on_a_terminal(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "stderr", Terminal())
    run_tiny(tmp_path / "run")
    assert "%|" not in sys.stderr.getvalue()  # no bar, core's or ours (warnings still print)
