"""Two evaluation stages: ``koopman.forward_eval`` and ``koopman.linearity``. Neither trains the model.

``koopman.forward_eval`` scores the trained φ, K, ψ, which reach it through
``state.artifacts["koopman.operators"][<term name>]``, written by an ``after_stage`` hook when a
training stage with a ``koopman.operator`` term ends. ``koopman.linearity`` needs no trained term:
it fits fresh φ, K, ψ on the frozen model (:func:`~stagewise_koopman.linearity.fit_post_hoc`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

import stagewise
from stagewise.builtins.train import lr_limit_check
from stagewise.engine.resume import refuse_damaged
from stagewise.loss import perplexity
from stagewise_koopman.forward_mode import koopman_forward_logits, output_head, plot_spectrum, spectral_radii
from stagewise_koopman.linearity import OneStepError, fit_post_hoc, frozen_hidden, one_step_error
from stagewise_koopman.loss import (
    ARTIFACT,
    KoopmanOperator,
    KoopmanOptions,
    artifact_problems,
    model_hidden,
    model_width,
    shape_problems,
    source_layers,
)


@dataclass
class ForwardEvalOptions:
    term: str = "koopman"  # name of the trained koopman.operator term (its `name` in `losses`)
    replace_layers: int = 2  # replace this many last blocks by ψ(K^k φ(h_{L-k}))
    split: str = "test"  # the split evaluated

    def __post_init__(self) -> None:
        stagewise.check_options([(self.replace_layers >= 1, "replace_layers",
                                  f"must be >= 1, got {self.replace_layers}")])


class ForwardEval(stagewise.Stage):
    """Perplexity of the standard forward pass and of Koopman forward mode on ``split``, the
    trained term's one-step error, each K's spectral radius, and ``plots/koopman_spectrum.png``.

    Reports ``<stage>/ppl``, ``<stage>/koopman_ppl``, ``<stage>/ppl_ratio``,
    ``<stage>/replaced_layers``, ``<stage>/one_step_error``, ``<stage>/K<l>/spectral_radius``.
    """

    name = "koopman.forward_eval"
    Options = ForwardEvalOptions

    def check(self, recipe, index, data) -> list[str]:
        earlier = _trained_terms(recipe, index)
        problems, where = super().check(recipe, index, data), recipe.stage_path(index)
        if self.options.term not in earlier:
            problems.append(f"{where}.term: no earlier stage trains a koopman.operator term named "
                            f"{self.options.term!r} (found: {', '.join(sorted(earlier)) or 'none'})")
            return problems
        trained_at, spec = earlier[self.options.term]
        n_hidden, trained_hidden = (model_hidden(recipe.model_options_at(i)) for i in (index, trained_at))
        if n_hidden is not None and trained_hidden is not None:
            problems += [f"{where}.replace_layers: {p}"
                         for p in self.replace_problems(spec.options, n_hidden - 1, trained_hidden)]
        return problems

    def replace_problems(self, term: KoopmanOptions, n_layer: int, trained_hidden: int) -> list[str]:
        """Can a term with options ``term``, trained on a model with ``trained_hidden`` hidden
        states, replace the last ``replace_layers`` of ``n_layer`` blocks?"""
        if shape_problems(term, trained_hidden):
            return []  # the training stage's own check reports the term
        name, replace = self.options.term, self.options.replace_layers
        if term.axis != "depth":
            return [f"Koopman forward mode needs a term with axis 'depth'; {name!r} has axis {term.axis!r}: leave this "
                    f"stage out (--set '~stages.NAME' removes a named recipe's stage NAME)"]
        sources = source_layers(term, trained_hidden)
        valid = ", ".join(str(n_layer - s) for s in reversed(sources) if n_layer - s >= 1) or "none"
        if replace > n_layer:
            return [f"{replace} is more than the model's {n_layer} blocks; with term {name!r} "
                    f"(source layers {sources}) replace_layers can be: {valid}"]
        if n_layer - replace not in sources:
            return [f"replacing the last {replace} of {n_layer} blocks needs the operator of term {name!r} from "
                    f"layer {n_layer - replace}, but its source layers are {sources}; replace_layers can be: {valid}"]
        return []

    @torch.no_grad()
    def run(self, state: stagewise.State) -> dict[str, Any]:
        o = self.options
        term = KoopmanOperator.from_artifact(_trained_term(state, o.term)).to(state.device)
        model = state.model
        nll = {"standard": 0.0, "koopman": 0.0}
        tokens = 0
        one_step = OneStepError(term)  # measured in the same pass as the perplexities
        # evaluation at the run's precision; the one-step error is the term's, in float32 (KoopmanOperator.errors)
        with stagewise.eval_mode(model), stagewise.autocast(state):
            # the whole split on every process: same figures
            for batch in state.batches(o.split, shard=False, desc=o.split):
                hidden = frozen_hidden(model, batch)
                target = batch["target"].reshape(-1)
                # forward mode first: it says what a model without logits_from_hidden lacks
                koopman_logits = koopman_forward_logits(model, term, hidden, o.replace_layers)
                for mode, logits in (("standard", output_head(model)(hidden[-1])), ("koopman", koopman_logits)):
                    nll[mode] += float(F.cross_entropy(logits.flatten(0, 1), target, reduction="sum"))
                tokens += target.numel()
                one_step.add(hidden, batch)
        ppl, koopman_ppl = perplexity(nll["standard"] / tokens), perplexity(nll["koopman"] / tokens)
        metrics = {"ppl": ppl, "koopman_ppl": koopman_ppl, "ppl_ratio": koopman_ppl / ppl,
                   "replaced_layers": o.replace_layers}
        metrics["one_step_error"], _ = one_step.means()
        metrics.update({f"K{layer}/spectral_radius": r for layer, r in spectral_radii(term).items()})
        if state.run_dir is not None:
            plot_spectrum(state.run_dir.plot_path("koopman_spectrum.png"), term,
                          f"{state.recipe.run.name}: spectrum of each K ({o.term})")
        return {f"{self.label}/{k}": v for k, v in metrics.items()}


def _trained_term(state: stagewise.State, name: str) -> dict[str, Any]:
    """The artifact of the trained term ``name``. In a resumed run it came from last.pt, which may hold
    anything there: refused naming its key path unless it rebuilds a term (a run that was not resumed
    wrote it itself)."""
    terms = state.artifacts.get(ARTIFACT)
    if state.resumed_from is not None:
        where = f"artifacts.{ARTIFACT}.{name}"
        if not (isinstance(terms, dict) and name in terms):
            problems = [f"artifacts.{ARTIFACT}: lacks {name}, the term an earlier stage trained"]
        else:
            problems = artifact_problems(terms[name], where) or _model_problems(terms[name], state, where)
        refuse_damaged(problems, state.resumed_from, state.recipe)
    if not (isinstance(terms, dict) and name in terms):  # check() saw to a training stage before this one
        raise RuntimeError(f"artifacts.{ARTIFACT}: lacks {name}, though an earlier stage trains that term")
    return terms[name]


def _model_problems(saved: dict[str, Any], state: stagewise.State, where: str) -> list[str]:
    """The term must fit this run's model: its count and width of hidden states (where the options say)."""
    model = {"n_hidden": model_hidden(state.model_options), "width": model_width(state.model_options)}
    return [f"{where}.{key}: {saved[key]}, but this run's model has {value}" for key, value in model.items()
            if value is not None and saved[key] != value]


def _trained_terms(recipe, index: int) -> dict[str, tuple[int, Any]]:
    """The ``koopman.operator`` terms the stages before ``index`` train: term name -> (stage index,
    its loss spec); a later stage's term of the same name replaces the earlier one's, as its artifact does.
    Only a training stage hands its terms on (``after_stage``): an evaluation's ``losses`` train nothing."""
    return {spec.name: (i, spec) for i, stage in enumerate(recipe.stages[:index])
            if issubclass(stage.component(), stagewise.TrainStage)
            for spec in getattr(stage.options, "losses", []) or [] if spec.use == "koopman.operator"}


@dataclass
class LinearityOptions:
    fit: KoopmanOptions = field(default_factory=KoopmanOptions)  # the fresh term fitted post hoc
    fit_steps: int = 200  # Adam steps (batches of fit_split) fitting φ, K, ψ on the frozen model
    lr: float = 3e-3  # Adam's learning rate for the fit
    fit_split: str = "train"  # the split the fit trains on
    split: str = "valid"  # the split the one-step error is measured on

    def __post_init__(self) -> None:
        stagewise.check_options([
            (self.fit_steps >= 1, "fit_steps", f"must be >= 1, got {self.fit_steps}"),
            (0 < self.lr < math.inf, "lr", f"must be a finite number > 0, got {self.lr}"),  # NaN fails both comparisons
            lr_limit_check(self.lr),
            (bool(self.fit_split), "fit_split", "must name the split the fit trains on (e.g. \"train\"), got \"\""),
            (not self.fit.dmd_every, "fit.dmd_every", f"must be 0: the post-hoc fit trains φ, K, ψ by Adam alone, "
                                                      f"with no DMD refresh (got {self.fit.dmd_every})"),
        ])


class Linearity(stagewise.Stage):
    """Fit fresh φ, K, ψ on the frozen model and report ``<stage>/one_step_error`` (the relative
    lifted one-step error on ``split``), ``<stage>/L<l>/one_step_error`` (the same per source
    layer l) and ``<stage>/fit_loss``. Run it on a baseline and on a
    Koopman-trained model; the ratio of their errors is the ``linearity_gain``."""

    name = "koopman.linearity"
    Options = LinearityOptions

    def check(self, recipe, index, data) -> list[str]:
        """The split check, plus ``fit`` against the model (with ``n_layer``) and the sequence length."""
        model_options = recipe.model_options_at(index)
        problems = shape_problems(self.options.fit, model_hidden(model_options), data.info.get("seq_len"),
                                  model_width(model_options))
        return super().check(recipe, index, data) + [f"{recipe.stage_path(index)}.fit: {p}" for p in problems]

    def run(self, state: stagewise.State) -> dict[str, Any]:
        o = self.options

        # every process fits and measures on whole batches, so all end with the same modules and figures
        def fit_batches(epoch: int) -> Iterable[dict[str, Any]]:
            return state.batches(o.fit_split, train=True, epoch=epoch, shard=False)

        def fit_bar(batches: Iterable[dict[str, Any]], total: int) -> Iterable[dict[str, Any]]:
            return state.progress(batches, desc="fit", total=total)

        term, fit_loss = fit_post_hoc(state.model, fit_batches, o.fit, o.fit_steps, o.lr, progress=fit_bar)
        error, per_layer = one_step_error(state.model, term, state.batches(o.split, shard=False, desc=o.split))
        metrics = {"one_step_error": error, "fit_loss": fit_loss}
        metrics.update({f"L{layer}/one_step_error": e for layer, e in per_layer.items()})
        return {f"{self.label}/{k}": v for k, v in metrics.items()}
