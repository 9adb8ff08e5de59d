"""Wall-clock measurements, reported next to the counted FLOPs (never instead of them).

Every timing is the median of ``repeats`` calls after one warm-up call. Nothing here changes
the model: training steps are timed as forward + backward without an optimizer step, and the
gradients are cleared afterwards. Wall-clock numbers are measurements, so they differ from run
to run (and with other load on the machine); they are left out of golden records.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

TIMING_METRICS = ("speedup_measured", "routed_ms", "full_depth_ms", "confidence_ms", "phase2_cache_speedup",
                  "phase2_token_mode_speedup", "phase2_cache_step_ms", "phase2_full_forward_step_ms",
                  "phase2_token_step_ms", "phase2_cache_epoch_s", "phase2_full_forward_epoch_s",
                  "phase2_token_epoch_s")


Rounds = Callable[[range], Iterable[int]]  # wraps the timed rounds, e.g. in a progress bar


def every_round(rounds: range) -> range:
    """The rounds, unwrapped: no progress bar."""
    return rounds


def interleaved_seconds(fns: dict[str, Callable[[], Any]], repeats: int,
                        rounds: Rounds = every_round) -> dict[str, float]:
    """Median seconds of each call, timed in interleaved rounds (round 0 warms up), so that load
    from other processes falls on every variant alike rather than on whichever ran second.
    ``rounds`` wraps ``range(repeats + 1)`` (a progress bar: it runs between the timed calls)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in rounds(range(repeats + 1)):
        for name, fn in fns.items():
            wait_for_device()
            started = time.perf_counter()
            fn()
            wait_for_device()
            if round_:
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def wait_for_device() -> None:
    """A GPU runs queued work after the call that queued it returns: wait for it, or a timing
    measures only the launches. Nothing to wait for on the CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def train_step_seconds(model: torch.nn.Module, losses: dict[str, Callable[[], torch.Tensor]], repeats: int,
                       precision: Callable[[], AbstractContextManager[Any]] = nullcontext) -> dict[str, float]:
    """Median seconds of one forward + backward of each loss (:func:`interleaved_seconds`), the forward
    inside ``precision()`` (e.g. ``lambda: stagewise.autocast(state)``), the backward outside it, as the
    engine's steps run; the model's gradients are cleared afterwards."""
    seconds = interleaved_seconds({name: _backward(fn, precision) for name, fn in losses.items()}, repeats)
    model.zero_grad(set_to_none=True)
    return seconds


def _backward(loss: Callable[[], torch.Tensor],
              precision: Callable[[], AbstractContextManager[Any]]) -> Callable[[], None]:
    """A call that computes ``loss`` and its gradients (a function, so each call binds its own loss)."""
    def step() -> None:
        with precision():
            value = loss()
        value.backward()

    return step
