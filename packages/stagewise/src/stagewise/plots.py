"""Plots, drawn only when matplotlib is installed (``pip install stagewise[plots]``).

Plugins call :func:`line_plot` with a path from ``state.run_dir.plot_path(name)``; without
matplotlib it returns False, so no run fails for want of a plot, and says why once per run
(per plots folder), with the command that installs the ``[plots]`` extra. A plot that cannot be
drawn (a matplotlib that fails to import, a bad ``MPLBACKEND``, a full disk) is a warning naming
the file and the error, and False: a finished run still writes its summary.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_hinted: set[Path] = set()  # the plots folders (one per run) already told why they stay empty


def have_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def line_plot(path: Path, series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *, title: str = "",
              xlabel: str = "", ylabel: str = "",
              vlines: Sequence[tuple[float, str]] = (), hlines: Sequence[tuple[float, str]] = ()) -> bool:
    """Draw named (x, y) series to a PNG; ``vlines`` mark positions (e.g. stage boundaries, named above
    the plot) and ``hlines`` reference values (e.g. |λ| = 1): labelled lines without markers, not in
    the legend. A NaN or Inf y is a gap in its line, counted in the legend ("val/loss (2 not finite,
    not drawn)"); x values that are all whole numbers (epochs, ranks) get whole-number ticks."""
    if not have_matplotlib():
        if path.parent not in _hinted:
            from stagewise.install import install_command

            print(f"stagewise: hint: matplotlib is not installed, so {path} (and this run's other plots) is not "
                  f"drawn; {install_command('stagewise', 'plots')} to get them", file=sys.stderr)
            _hinted.add(path.parent)
        return False
    try:
        fig = _figure(series, title=title, xlabel=xlabel, ylabel=ylabel, vlines=vlines, hlines=hlines)
        from stagewise.engine.checkpoint import atomic_write_bytes  # a run has imported torch already

        # atomic like every file of a run directory: a run killed while drawing keeps the earlier picture.
        # The write makes plots/, so a run without matplotlib has none. The fixed margins clip a wide tick
        # label's ylabel: bbox_inches="tight"
        atomic_write_bytes(path, lambda f: fig.savefig(f, format="png", bbox_inches="tight", pad_inches=0.1))
    except Exception as exc:  # a picture is not worth a run: a broken matplotlib or MPLBACKEND fails no run
        print(f"stagewise: warning: {path} is not drawn ({type(exc).__name__}: {exc}); the run goes on without it",
              file=sys.stderr)
        return False
    return True


def _figure(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *, title: str, xlabel: str,
            ylabel: str, vlines: Sequence[tuple[float, str]], hlines: Sequence[tuple[float, str]]) -> Figure:
    from matplotlib.figure import Figure  # not pyplot: no global figures, no GUI backend
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7, 4), dpi=110)
    fig.subplots_adjust(left=0.1, right=0.97, top=0.92, bottom=0.12)  # tight_layout: ~40% of the time
    ax = fig.subplots()
    for name, (xs, ys) in series.items():
        # matplotlib leaves NaN and Inf out of the line: the legend says so, or an all-NaN series is an empty entry
        hidden = sum(not math.isfinite(y) for y in ys)
        ax.plot(xs, ys, marker="o", markersize=3, label=f"{name} ({hidden} not finite, not drawn)" if hidden else name)
    for x, _ in vlines:
        ax.axvline(x, color="grey", linestyle=":", linewidth=1)
    if vlines:  # named above the axes, upright: short stages' or long names would overlap each other and the data
        top = ax.secondary_xaxis("top")
        top.set_xticks([x for x, _ in vlines])
        top.set_xticklabels([label for _, label in vlines], rotation=90, fontsize=8, color="grey")
        top.tick_params(length=0)
    for y, label in hlines:
        ax.axhline(y, color="grey", linestyle="--", linewidth=1)
        ax.text(1.0, y, f"{label} ", transform=ax.get_yaxis_transform(), ha="right", va="bottom", fontsize=8,
                color="grey")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if all(float(x).is_integer() for xs, _ in series.values() for x in xs):  # epochs, ranks: whole ticks only,
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # also for one point (was 0.48, ...)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig
