"""Progress bars for the plugin's long work outside training: the post-hoc fit of
``koopman.linearity`` and the evaluation passes of both stages, which run for minutes on real data.

They follow the rule of core's training bar; once core has a public helper for this, these two
functions give way to it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def show_bar(state: Any) -> bool:
    """Core's rule for its training bar (``stagewise/engine/loop.py``, ``TrainLoop._show_bar``):
    not with ``--quiet``, on the main process only, and only when stderr is a terminal (so never
    in tests or in a redirected log)."""
    return not state.quiet and state.is_main and sys.stderr.isatty()


def progress_bar(items: Iterable[T], label: str | None, total: int | None = None) -> Iterable[T]:
    """``items`` behind a bar named ``label`` that is cleared when done (as core's), or without a
    bar when ``label`` is None."""
    return tqdm(items, total=total, desc=label, leave=False, disable=label is None)
