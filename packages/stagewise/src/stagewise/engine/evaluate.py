"""Evaluation: exact metric sums over a whole split, reduced across processes."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from stagewise.engine.distributed import all_keys, all_reduce_sums
from stagewise.engine.objective import forward_batch, needs_of, term_error
from stagewise.engine.precision import autocast
from stagewise.errors import ConfigError
from stagewise.loss import Loss

if TYPE_CHECKING:
    from stagewise.engine.state import State


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model`` in eval mode (no dropout) inside the block; its training mode is restored on
    leaving, also when the block raises. Gradients are untouched: add ``torch.no_grad()``."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate(state: State, terms: dict[str, Loss], batches: Iterable[dict[str, Any]], prefix: str,
             forward_fn: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> dict[str, float]:
    """Metrics of every term over ``batches``, named ``<prefix>/<metric>`` for the first term
    (the stage's main objective) and ``<prefix>/<term>/<metric>`` for the others."""
    model = state.model
    needs = needs_of(terms.values())
    forward_fn = forward_fn or (lambda batch: forward_batch(model, batch, needs))
    sums: dict[tuple[str, str], list[float]] = {}
    with eval_mode(model), autocast(state):  # evaluation runs at the run's precision, as training does
        for batch in batches:
            outputs = forward_fn(batch)
            for name, term in terms.items():
                try:
                    found = term.eval_sums(outputs, batch, state)
                except ConfigError as exc:
                    raise term_error(state, name, exc) from None
                for metric, (total, count) in found.items():
                    acc = sums.setdefault((name, metric), [0.0, 0.0])
                    acc[0] += total
                    acc[1] += count
    keys = all_keys(list(sums), state.dist)
    flat = all_reduce_sums([v for k in keys for v in sums.get(k, (0.0, 0.0))], state.dist)
    means: dict[str, dict[str, float]] = {}
    for i, (name, metric) in enumerate(keys):
        total, count = flat[2 * i], flat[2 * i + 1]
        means.setdefault(name, {})[metric] = total / count if count else float("nan")
    first = next(iter(terms), None)
    metrics: dict[str, float] = {}
    for name, term in terms.items():
        scope = prefix if name == first else f"{prefix}/{name}"
        for metric, value in term.summarize(means.get(name, {})).items():
            metrics[f"{scope}/{metric}"] = value
    return metrics
