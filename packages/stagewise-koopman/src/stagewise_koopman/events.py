"""What the plugin does at run events, only in stages that train a ``koopman.operator`` term.

- after each optimizer step: the step's lifted pairs enter the DMD buffer if the step trained
  the term (not a batch skipped as non-finite, not an epoch at weight 0), then the optional DMD
  refresh of K (``dmd_every``); under torchrun every rank records the pairs of every rank (those
  one process would keep of the global batch), so the ranks fit one operator;
- after each epoch: a ``koopman.epoch`` record with each operator's change since the last
  epoch and the Koopman share of the loss;
- after the stage: the trained φ, K, ψ go to ``state.artifacts["koopman.operators"]``, so
  later stages (forward mode, reports) get them; the stage's checkpoint holds them too.
"""

from __future__ import annotations

import math
from typing import Any

import stagewise
from stagewise_koopman.loss import ARTIFACT, KoopmanOperator


def koopman_terms(state: stagewise.State) -> dict[str, KoopmanOperator]:
    return {name: term for name, term in state.terms.items() if isinstance(term, KoopmanOperator)}


def after_step(state: stagewise.State, loss: float) -> None:
    for name, term in koopman_terms(state).items():
        every = term.options.dmd_every
        if not every:
            continue
        # the step trained the term unless its batch was skipped as non-finite (``loss`` is the global
        # batch's, alike on every rank) or the term's weight is 0: under torchrun such a term is still
        # computed, but one process would not have run it, so its pairs must not reach the buffer
        trained = math.isfinite(loss) and state.term_weights.get(name, 0.0) != 0.0
        term.end_step(trained, state.dist)
        if state.step % every == 0:
            term.refresh_operator()  # every rank holds the same pairs, so fits the same K


def after_epoch(state: stagewise.State, metrics: dict[str, Any]) -> None:
    for name, term in koopman_terms(state).items():
        record = {f"{name}/{k}": v for k, v in term.operator_change().items()}
        record[f"{name}/share"] = koopman_share(metrics, name)
        state.log("koopman.epoch", **record)


def koopman_share(metrics: dict[str, Any], name: str) -> float:
    """Weighted term / total loss over the epoch: the engine's mean of weight × term per step
    (``train/<term>/weighted``, exact under a ramp or fallbacks) ÷ the mean total loss."""
    total = metrics.get("train/loss") or 0.0
    return metrics.get(f"train/{name}/weighted", 0.0) / total if total else 0.0


def after_stage(state: stagewise.State) -> None:
    terms = koopman_terms(state)
    if terms:
        state.artifacts.setdefault(ARTIFACT, {}).update({name: t.artifact() for name, t in terms.items()})
