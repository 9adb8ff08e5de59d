"""Plots, drawn only when matplotlib is installed (``pip install stagewise[plots]``).

Plugins call :func:`line_plot` with a path from ``state.run_dir.plot_path(name)``; without
matplotlib it returns False, so no run fails for want of a plot, and says why once per run
(per plots folder), with the command that installs the ``[plots]`` extra.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

_hinted: set[Path] = set()  # the plots folders (one per run) already told why they stay empty


def have_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def line_plot(path: Path, series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *, title: str = "",
              xlabel: str = "", ylabel: str = "",
              vlines: Sequence[tuple[float, str]] = (), hlines: Sequence[tuple[float, str]] = ()) -> bool:
    """Draw named (x, y) series to a PNG; ``vlines`` mark positions (e.g. stage boundaries) and
    ``hlines`` reference values (e.g. |λ| = 1): labelled lines without markers, not in the legend."""
    if not have_matplotlib():
        if path.parent not in _hinted:
            from stagewise.install import install_command

            print(f"stagewise: hint: matplotlib is not installed, so {path} (and this run's other plots) is not "
                  f"drawn; {install_command('stagewise', 'plots')} to get them", file=sys.stderr)
            _hinted.add(path.parent)
        return False
    from matplotlib.figure import Figure  # not pyplot: no global figures, no GUI backend
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7, 4), dpi=110)
    fig.subplots_adjust(left=0.1, right=0.97, top=0.92, bottom=0.12)  # tight_layout: ~40% of the time
    ax = fig.subplots()
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", markersize=3, label=name)
    for x, label in vlines:
        ax.axvline(x, color="grey", linestyle=":", linewidth=1)
        ax.text(x, 1.0, f" {label}", transform=ax.get_xaxis_transform(), va="top", fontsize=8, color="grey")
    for y, label in hlines:
        ax.axhline(y, color="grey", linestyle="--", linewidth=1)
        ax.text(1.0, y, f"{label} ", transform=ax.get_yaxis_transform(), ha="right", va="bottom", fontsize=8,
                color="grey")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    from stagewise.engine.checkpoint import atomic_write_bytes  # a run has imported torch already

    # atomic like every file of a run directory: a run killed while drawing keeps the earlier picture.
    # The write makes plots/, so a run without matplotlib has none. The fixed margins clip a wide tick
    # label's ylabel: bbox_inches="tight"
    atomic_write_bytes(path, lambda f: fig.savefig(f, format="png", bbox_inches="tight", pad_inches=0.1))
    return True
