"""Koopman forward mode: replace the last layers of the model by ψ(K^k φ(h_{L-k})).

The trained decoder ψ returns a normalised hidden state, which the model's own output head
(``logits_from_hidden``: final norm, then projection) turns into logits. Each position uses
only its own hidden state, so forward mode is exactly as causal as the layers below it.
A finished run's trained φ, K, ψ come back with :func:`load_term`. Also the report
``koopman.forward_eval`` gives beside the perplexities: each K's spectral radius
(:func:`spectral_radii`) and the spectrum plot (:func:`plot_spectrum`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from stagewise.engine.checkpoint import load_checkpoint
from stagewise.errors import CheckpointError
from stagewise.load import checkpoint_of
from stagewise.plots import line_plot
from stagewise_koopman.loss import ARTIFACT, KoopmanOperator, artifact_problems


def load_term(source: str | Path, name: str = "koopman") -> KoopmanOperator:
    """The trained φ, K, ψ of the ``koopman.operator`` term ``name`` (its ``name`` in ``losses``)
    from ``source`` (a run directory: its last checkpoint; or a checkpoint file), on CPU, in eval
    mode: ready for :func:`koopman_forward_logits` with ``stagewise.load_model(source)``."""
    checkpoint = checkpoint_of(source)
    terms = load_checkpoint(checkpoint, ("artifacts",))["artifacts"].get(ARTIFACT, {})
    if isinstance(terms, dict) and name not in terms:
        raise CheckpointError(f"{checkpoint}: holds no trained koopman.operator term named {name!r} "
                              f"(found: {', '.join(sorted(terms)) or 'none'}); pass one of those as name, or use "
                              f"a checkpoint written after the stage that trains the term")
    where = f"artifacts.{ARTIFACT}"
    problems = (artifact_problems(terms[name], f"{where}.{name}") if isinstance(terms, dict)
                else [f"{where}: a {type(terms).__name__}, expected a table of trained terms by name"])
    if problems:
        raise CheckpointError(f"{checkpoint}: not the trained term a run writes: {'; '.join(problems)}; use a "
                              f"checkpoint the run wrote, untouched (or run the recipe again)")
    return KoopmanOperator.from_artifact(terms[name]).eval()


def koopman_forward_logits(model: torch.nn.Module, term: KoopmanOperator, hidden: list[torch.Tensor],
                           replace: int) -> torch.Tensor:
    """Logits (B, T, V) with blocks L-replace+1..L replaced by ψ(K^replace φ(h_{L-replace}))."""
    head = output_head(model)
    source = len(hidden) - 1 - replace
    if term.options.axis != "depth" or source not in term.sources:
        raise ValueError(f"replacing the last {replace} layers needs a depth operator from layer {source}; "
                         f"the term has axis {term.options.axis!r} and source layers {term.sources}")
    i = term.sources.index(source)
    j = slice(i, i + 1)  # that layer's φ, K, ψ
    h = hidden[source]  # (B, T, C)
    B, T, C = h.shape
    z = term.koopman.advance(term.koopman.lift(h.reshape(1, B * T, C), j), replace, j)
    return head(term.koopman.decode(z, j).view(B, T, C))


def output_head(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model's ``logits_from_hidden``: hidden states (..., C) -> logits (..., V). Any model may have
    one (core's transformer does), so it is looked up by name."""
    head = getattr(model, "logits_from_hidden", None)
    if not callable(head):
        raise ValueError(f"Koopman forward mode needs the model's output head as logits_from_hidden(h) "
                         f"(as stagewise.transformer has); {type(model).__name__} has none")
    return head


def spectral_radii(term: KoopmanOperator) -> dict[int, float]:
    """max |λ| of each K_l, by source layer."""
    radii = term.koopman.eigenvalues().abs().max(-1).values
    return {layer: float(r) for layer, r in zip(term.sources, radii, strict=True)}


def plot_spectrum(path: Path, term: KoopmanOperator, title: str) -> bool:
    """Eigenvalue moduli of each K_l, sorted, against the unit circle (a reference line); False without matplotlib."""
    moduli = term.koopman.eigenvalues().abs().sort(-1, descending=True).values  # (n, D)
    ranks = list(range(1, moduli.shape[1] + 1))
    series = {f"K{layer}": (ranks, moduli[i].tolist()) for i, layer in enumerate(term.sources)}
    return line_plot(path, series, title=title, xlabel="eigenvalue rank", ylabel="|λ|", hlines=[(1.0, "|λ| = 1")])
