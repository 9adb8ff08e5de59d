"""Rate-limited warnings, Python's warnings above progress bars, and the non-finite loss guard."""

from __future__ import annotations

import math
import sys
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from tqdm import tqdm

from stagewise.errors import TrainingError


class RateLimitedWarnings:
    """Each kind of warning is printed at most once per epoch; the rest are counted.

    ``flush()`` at the end of an epoch (and of a stage, for what a stage warned outside its
    epochs) prints one line per kind that repeated, with its count, and returns the counts so
    they can be logged. ``--quiet`` does not silence warnings; only processes other than the
    main one are ``silent``, so that each warning is printed once.
    """

    def __init__(self, silent: bool = False):
        self.silent = silent
        self.counts: Counter[str] = Counter()

    def warn(self, kind: str, message: str) -> None:
        self.counts[kind] += 1
        if self.counts[kind] == 1 and not self.silent:
            _say(f"stagewise: warning: {message}")

    def flush(self, period: str = "this epoch") -> dict[str, int]:
        counts = dict(self.counts)
        for kind, n in counts.items():
            if n > 1 and not self.silent:
                _say(f"stagewise: warning: {kind!r} happened {n} times {period}")
        self.counts.clear()
        return counts


def _say(line: str) -> None:
    """``line`` on stderr, above a progress bar on it: tqdm clears the bar first and draws it again
    below, where a plain print would append the line to the bar's half-drawn one."""
    tqdm.write(line, file=sys.stderr)
    sys.stderr.flush()


@contextmanager
def python_warnings_above_bars(bars: bool) -> Iterator[None]:
    """While progress bars may be drawn (``bars``), Python's warnings (torch's, a plugin's) to stderr go
    through :func:`_say` too. Off a terminal nothing changes, so tests' warning capture sees them as before."""
    if not bars:
        yield
        return
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if file is not None and file is not sys.stderr:
            return shown(message, category, filename, lineno, file, line)
        _say(warnings.formatwarning(message, category, filename, lineno, line).rstrip("\n"))

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


class NonFiniteGuard:
    """Skip batches whose loss is NaN/Inf, count them, and stop after ``limit`` in a row."""

    def __init__(self, limit: int, warnings: RateLimitedWarnings):
        self.limit = limit
        self.warnings = warnings
        self.in_a_row = 0
        self.skipped = 0

    def check(self, value: float, where: str) -> bool:
        """True when the loss is finite (train on it); False to skip the batch."""
        if math.isfinite(value):
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.skipped += 1
        self.warnings.warn("nonfinite_loss", f"non-finite loss ({value}) at {where}; batch skipped")
        if self.in_a_row >= self.limit:
            raise TrainingError(
                f"{self.in_a_row} non-finite losses in a row at {where} (max_nonfinite = {self.limit}). "
                "Lower the learning rate, set grad_clip, check the data for NaN/Inf, "
                "or raise the stage's max_nonfinite."
            )
        return False
