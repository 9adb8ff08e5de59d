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

from stagewise.engine.atomic import atomic_write_bytes

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# (x values, y values) by name; a None y breaks the line there (see line_plot)
Series = Mapping[str, tuple[Sequence[float], Sequence[float | None]]]

_hinted: set[Path] = set()  # the plots folders (one per run) already told why they stay empty

# On a linear axis every value below max/10 is squeezed into the bottom tenth of the plot: a loss
# falling from 8 to 0.01 lies flat there from its second epoch on. From a factor of 10 up a log
# axis spreads those epochs out; below it the linear axis reads well and its ticks read easier.
LOG_SCALE_RANGE = 10.0


def have_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def line_plot(path: Path, series: Series, *, title: str = "", xlabel: str = "", ylabel: str = "", logy: bool = False,
              vlines: Sequence[tuple[float, str]] = (), hlines: Sequence[tuple[float, str]] = ()) -> bool:
    """Draw named (x, y) series to a PNG; ``vlines`` mark positions (e.g. stage boundaries, named above
    the plot) and ``hlines`` reference values (e.g. |λ| = 1): labelled lines without markers, not in
    the legend. A None y is no point but a break in its line (e.g. at a stage start: the points either
    side are different models); a NaN or Inf y is a gap in its line, counted in the legend ("val/loss
    (2 not finite, not drawn)"); x values that are all whole numbers (epochs, ranks) get whole-number
    ticks. ``logy``: a log y axis (:func:`log_scale_reads_better` says when)."""
    if not have_matplotlib():
        if path.parent not in _hinted:
            from stagewise.install import install_command

            print(f"stagewise: hint: matplotlib is not installed, so {path} (and this run's other plots) is not "
                  f"drawn; {install_command('stagewise', 'plots')} to get them", file=sys.stderr)
            _hinted.add(path.parent)
        return False
    try:
        fig = _figure(series, title=title, xlabel=xlabel, ylabel=ylabel, logy=logy, vlines=vlines, hlines=hlines)
        # atomic like every file of a run directory: a run killed while drawing keeps the earlier picture.
        # The write makes plots/, so a run without matplotlib has none. The fixed margins clip a wide tick
        # label's ylabel: bbox_inches="tight"
        atomic_write_bytes(path, lambda f: fig.savefig(f, format="png", bbox_inches="tight", pad_inches=0.1))
    except Exception as exc:  # a picture is not worth a run: a broken matplotlib or MPLBACKEND fails no run
        print(f"stagewise: warning: {path} is not drawn ({type(exc).__name__}: {exc}); the run goes on without it",
              file=sys.stderr)
        return False
    return True


def log_scale_reads_better(series: Series) -> bool:
    """Whether ``series`` read better on a log y axis: every finite y is positive and the largest is at
    least ``LOG_SCALE_RANGE`` times the smallest (NaN, Inf and breaks are not drawn, so do not count)."""
    ys = [y for _, values in series.values() for y in values if y is not None and math.isfinite(y)]
    return bool(ys) and min(ys) > 0 and max(ys) >= LOG_SCALE_RANGE * min(ys)


def _log_y(ax: Axes) -> None:
    """A log y axis labelled in plain numbers (0.2, not 2×10⁻¹). matplotlib labels only powers of ten once
    the axis spans more than a decade, which left a loss from 2 to 0.15 a single label (1): up to 4 decades
    the labels are at 1, 2 and 5 × 10ⁿ; past that, where those would overlap, at powers of ten."""
    from matplotlib.ticker import LogLocator, NullFormatter, StrMethodFormatter

    ax.set_yscale("log")
    lo, hi = ax.get_ylim()  # the data's range, with matplotlib's margins
    if hi <= 1e4 * lo:
        ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.yaxis.set_minor_formatter(NullFormatter())  # unlabelled ticks at the other multiples
    ax.yaxis.set_major_formatter(StrMethodFormatter("{x:g}"))


def _figure(series: Series, *, title: str, xlabel: str, ylabel: str, logy: bool,
            vlines: Sequence[tuple[float, str]], hlines: Sequence[tuple[float, str]]) -> Figure:
    from matplotlib.figure import Figure  # not pyplot: no global figures, no GUI backend
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7, 4), dpi=110)
    fig.subplots_adjust(left=0.1, right=0.97, top=0.92, bottom=0.12)  # tight_layout: ~40% of the time
    ax = fig.subplots()
    for name, (xs, ys) in series.items():
        # matplotlib leaves NaN and Inf out of the line: the legend says so, or an all-NaN series is an empty entry;
        # a break is a NaN too, drawn in the line's colour on both sides, but no value left out
        hidden = sum(y is not None and not math.isfinite(y) for y in ys)
        ax.plot(xs, [math.nan if y is None else y for y in ys], marker="o", markersize=3,
                label=f"{name} ({hidden} not finite, not drawn)" if hidden else name)
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
    if logy:
        _log_y(ax)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if all(float(x).is_integer() for xs, ys in series.values() for x, y in zip(xs, ys, strict=True)
           if y is not None):  # epochs, ranks (a break lies between two): whole ticks only,
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # also for one point (was 0.48, ...)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig
