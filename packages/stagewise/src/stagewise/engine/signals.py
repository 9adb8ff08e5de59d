"""SIGTERM asks a run to stop where it can checkpoint: what a cluster's preemption (SLURM, Kubernetes, a
cloud's spot reclaim) sends, some time before its SIGKILL.

While :func:`stopping_on_signals` holds, the signal only records the request (:func:`requested`); the
engine stops at its next stop point: a training stage after the optimizer step in flight, once it has
written the mid-stage checkpoint that ``checkpoint_every_n_steps`` writes (``TrainLoop``), else after the
checkpoint at an epoch's or a stage's end. A second signal (:data:`REPEAT_S` on) stops the run at once, as
Ctrl-C does.

Under torchrun every process must stop after the same step, or one would wait forever in the checkpoint's
collective for another. Each batch's sum of the processes' example counts (``TrainLoop._global_means``),
which they make anyway, carries their votes (:func:`vote`, :func:`votes_and_count`): a collective of its
own would cost every step a round trip, 11-24% of the step of the tests' small model with gloo (docs/concepts.md).
The other stop points, once an epoch or a stage, agree in a collective of their own (:func:`stop_point`).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, cast

from stagewise.engine.distributed import all_reduce_sums

if TYPE_CHECKING:
    from stagewise.engine.distributed import DistInfo

SIGNALS = (signal.SIGTERM,)
# a second signal sooner than this after the first is the same request again, not "now": SLURM signals every
# process of a job step, and torchrun's agent passes the signal it got on to its workers, which then get two
REPEAT_S = 2.0
# a process's vote added to its example count: counts stay below 2**32, votes below 2**20 processes, so the
# float64 sum holds both exactly and the count is the one the processes sum without votes, bit for bit
VOTE = 2.0**32


class StopSignal(KeyboardInterrupt):
    """Raised where a run stops on a signal; the runner turns it into :class:`~stagewise.errors.RunStopped`,
    which names the run's folder. ``signal``: the signal's name (None: another process of a torchrun job
    got it); ``where``: where the run checkpointed, None when a second signal stopped it at once."""

    def __init__(self, signal_name: str | None, where: str | None):
        super().__init__(signal_name, where)
        self.signal, self.where = signal_name, where


class _Request:
    """The signal that asked this process's run to stop, and when (``time.monotonic()``)."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self.at = 0.0


_request: _Request | None = None  # while a run holds the handler (stopping_on_signals)


@contextmanager
def stopping_on_signals() -> Iterator[None]:
    """Take :data:`SIGNALS` as a request to stop while inside, then give them back their handlers. Only in the
    main thread (Python calls signal handlers there alone): a run in another thread keeps them as they are.
    Inside another one (a run started by code a run calls), the outer one's handler and request hold."""
    global _request
    if _request is not None or threading.current_thread() is not threading.main_thread():
        yield
        return
    _request = _Request()
    previous = {sig: signal.signal(sig, _handle) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _request = None


def _handle(signum: int, frame: Any) -> None:
    request = cast(_Request, _request)  # installed with it, and given back before it is cleared
    now = time.monotonic()
    if request.signal is None:
        request.signal, request.at = signal.Signals(signum).name, now
    elif now - request.at >= REPEAT_S:
        raise StopSignal(signal.Signals(signum).name, None)


def requested() -> str | None:
    """The name of the signal that asked this process's run to stop; None if none has."""
    return None if _request is None else _request.signal


def vote() -> float:
    """What this process adds to its example count in a batch's sum: :data:`VOTE` once asked to stop."""
    return 0.0 if requested() is None else VOTE


def votes_and_count(total: float) -> tuple[int, float]:
    """The processes that voted to stop, and the examples, in the sum of the processes' counts and votes."""
    votes, count = divmod(total, VOTE)
    return int(votes), count


def stop_point(info: DistInfo, where: str) -> None:
    """Raise :class:`StopSignal` if a process was asked to stop (all of a torchrun job's agree here, once an
    epoch or a stage): the run has just written its checkpoint ``where``."""
    asked = requested()
    if info.enabled:  # every process calls it at the same point
        if all_reduce_sums([vote()], info)[0] == 0.0:
            return
    elif asked is None:
        return
    raise StopSignal(asked, where)
