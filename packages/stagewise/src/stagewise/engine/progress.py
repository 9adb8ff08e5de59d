"""Progress bars: the engine's (epochs, evaluations) and those of loading the data, drawn alike."""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from tqdm import tqdm

# tqdm cuts a line wider than the terminal at its end, where the time left and the loss are: a narrow one (a
# split pane) gets them without the bar
NARROW_COLUMNS = 60
COMPACT_BAR = "{desc}: {n_fmt}/{total_fmt} <{remaining}{postfix}"

LOADING_DELAY = 1.0  # seconds a step of loading runs before its bar shows: a small file's load shows none
_loading_shown: ContextVar[bool] = ContextVar("stagewise_loading_bars", default=False)


def progress_bar(iterable: Iterable[Any] | None = None, *, desc: str, shown: bool, **options: Any) -> tqdm:
    """A tqdm bar on stderr, cleared when done; drawn only if ``shown``. ``options`` go to tqdm (``total``, ...)."""
    narrow = shutil.get_terminal_size().columns < NARROW_COLUMNS
    return tqdm(iterable, desc=desc, leave=False, disable=not shown, bar_format=COMPACT_BAR if narrow else None,
                **options)


@contextmanager
def showing_loading_bars(shown: bool) -> Iterator[None]:
    """Within: :func:`loading_bar` draws its bars if ``shown`` (the runner's: main process, a terminal, no --quiet)."""
    token = _loading_shown.set(shown)
    try:
        yield
    finally:
        _loading_shown.reset(token)


def loading_bar(desc: str, total: float) -> tqdm:
    """A bar counting bytes of a long step of loading the data (e.g. tokenising), named ``stagewise: <desc>``;
    drawn as the engine's bars are (see :func:`showing_loading_bars`), once the step has run ``LOADING_DELAY``
    seconds."""
    return progress_bar(desc=f"stagewise: {desc}", shown=_loading_shown.get(), total=total, unit="B",
                        unit_scale=True, delay=LOADING_DELAY)
