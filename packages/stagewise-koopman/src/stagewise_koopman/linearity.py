"""How linear are a frozen model's dynamics? Fit fresh Koopman modules post hoc and measure.

The linearity gain (``linearity_gain`` in the benchmark: the baseline's error ÷ the hybrid's)
compares two models with the same procedure: fresh φ, K, ψ fitted for the same number of steps
on each frozen model (:func:`fit_post_hoc`), then the relative lifted one-step error
‖K φ(h) − φ(h')‖² / spread(φ(h')) on held-out data (:func:`one_step_error`). A model trained
with the Koopman term should need less to be linear, so its error is lower.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from itertools import chain, islice
from typing import Any

import torch

import stagewise
from stagewise.errors import TrainingError
from stagewise_koopman.loss import KoopmanOperator, KoopmanOptions, probe_hidden, relative_distance, shape_problems

Batches = Callable[[int], Iterable[dict[str, Any]]]  # epoch -> that epoch's training batches
Progress = Callable[[Iterable[dict[str, Any]], int], Iterable[dict[str, Any]]]  # (batches, total) -> batches


def no_bar(batches: Iterable[dict[str, Any]], total: int) -> Iterable[dict[str, Any]]:
    """The batches, unwrapped: no progress bar."""
    return batches


def frozen_hidden(model: torch.nn.Module, batch: dict[str, Any]) -> list[torch.Tensor]:
    """The model's hidden states for ``batch``, without gradients (the model is not trained)."""
    with torch.no_grad():
        return stagewise.forward_batch(model, batch, stagewise.Needs(hidden=True))["hidden"]


def fit_post_hoc(model: torch.nn.Module, batches: Batches, options: KoopmanOptions, steps: int,
                 lr: float, progress: Progress = no_bar) -> tuple[KoopmanOperator, float]:
    """Fresh Koopman modules fitted with Adam for ``steps`` batches on the frozen ``model``;
    returns them and the mean loss of the last 10% of steps. ``progress(batches, steps)`` wraps
    the step batches, e.g. in a progress bar (``state.progress``)."""
    stream = _cycle(batches)
    first = next(stream)
    n_hidden, width, seq_len = probe_hidden(model, first)
    problems = shape_problems(options, n_hidden, seq_len, width)
    if problems:
        raise ValueError("; ".join(problems))
    term = KoopmanOperator(options).build(n_hidden, width).to(next(model.parameters()).device)
    optimizer = torch.optim.Adam(term.parameters(), lr=lr)
    tail: list[float] = []
    with stagewise.eval_mode(model):
        for step, batch in enumerate(progress(islice(chain([first], stream), steps), steps)):
            loss = sum(term({"hidden": frozen_hidden(model, batch)}, batch, None).values())
            value = loss.item()
            if not math.isfinite(value):  # else φ, K, ψ turn NaN and the errors measured with them are NaN
                raise TrainingError(f"koopman.linearity: the post-hoc fit's loss is {value} at step {step + 1} of "
                                    f"{steps}; lower its lr (now {lr}) or the part weights of fit")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step >= steps - max(1, steps // 10):
                tail.append(value)
    return term, sum(tail) / len(tail)


@torch.no_grad()
def one_step_error(model: torch.nn.Module, term: KoopmanOperator, batches: Iterable[dict[str, Any]]
                   ) -> tuple[float, dict[int, float]]:
    """Relative lifted one-step error of ``term`` on the frozen ``model``, mean over batches:
    over all source layers, and per source layer (which steps the model made linear)."""
    error = OneStepError(term)
    with stagewise.eval_mode(model):
        for batch in batches:
            error.add(frozen_hidden(model, batch), batch)
    return error.means()


class OneStepError:
    """Running sums for :func:`one_step_error`, so a stage that runs the model on the batches
    anyway (``koopman.forward_eval``) measures it in the same pass."""

    def __init__(self, term: KoopmanOperator):
        self.term = term
        self.total = self.count = 0.0
        # on the term's device: a CPU tensor would refuse the CUDA tensors added to it
        self.per_layer = torch.zeros(len(term.sources), dtype=torch.float64, device=term.koopman.operator.device)

    def add(self, hidden: list[torch.Tensor], batch: dict[str, Any]) -> None:
        """One batch, weighted by its sequences."""
        errors, lifted = self.term.errors(hidden)
        n = float(batch["input"].shape[0])
        self.total, self.count = self.total + float(errors["one_step"]) * n, self.count + n
        self.per_layer += layer_one_step(self.term, lifted).double() * n

    def means(self) -> tuple[float, dict[int, float]]:
        """(over all source layers, by source layer)."""
        return self.total / self.count, {layer: float(e) / self.count
                                         for layer, e in zip(self.term.sources, self.per_layer, strict=True)}


def layer_one_step(term: KoopmanOperator, lifted: torch.Tensor) -> torch.Tensor:
    """Per source layer relative lifted one-step error, (n,), from the lifted states (n, s+1, M, D)."""
    return relative_distance(term.koopman.advance(lifted[:, 0]), lifted[:, 1], term.options)


def _cycle(batches: Batches) -> Iterator[dict[str, Any]]:
    epoch = 0
    while True:
        yield from batches(epoch)
        epoch += 1
