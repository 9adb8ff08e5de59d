"""A stage's objective: the model's forward pass and its loss terms in one module.

Loss terms run inside ``Objective.forward`` so that, under DistributedDataParallel, gradients
of parameters owned by losses are averaged across processes like the model's own.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, cast

import torch

from stagewise.errors import ConfigError
from stagewise.loss import Loss, Needs, check_value
from stagewise.specs import LossSpec, term_paths

if TYPE_CHECKING:
    from stagewise.engine.state import State


def forward_batch(model: torch.nn.Module, batch: dict[str, Any], needs: Needs) -> dict[str, Any]:
    """Run ``model`` on a batch. Models with ``forward_batch(batch, needs)`` return a dict of
    outputs; any other module is called on ``batch["input"]`` and its result is ``"output"``."""
    own = getattr(model, "forward_batch", None)
    if own is not None:
        return own(batch, needs)
    out = model(batch["input"])
    return out if isinstance(out, dict) else {"output": out}


class Objective(torch.nn.Module):
    """The model plus named loss terms; ``forward(batch)`` gives each term's raw value."""

    def __init__(self, model: torch.nn.Module, terms: dict[str, Loss], state: State):
        super().__init__()
        self.model = model
        self.terms = torch.nn.ModuleDict(terms)
        self.state = state  # not a module: plain attribute
        self.needs = needs_of(terms.values())

    def loss_terms(self) -> dict[str, Loss]:
        """The terms by name, as ``__init__`` got them (a ModuleDict types its values as Module)."""
        return cast(dict[str, Loss], dict(self.terms.items()))

    def outputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        return forward_batch(self.model, batch, self.needs)

    def forward(self, batch: dict[str, Any], forward_fn=None, active: set[str] | None = None) -> dict[str, Any]:
        """Each term's value on ``batch``; only the ``active`` terms (weight > 0) when given."""
        outputs = (forward_fn or self.outputs)(batch)
        values = {}
        try:
            for name, term in self.loss_terms().items():
                if active is None or name in active:
                    values[name] = check_value(term, term(outputs, batch, self.state))
        except ConfigError as exc:
            raise term_error(self.state, name, exc) from None
        return values


def needs_of(terms: Iterable[Loss]) -> Needs:
    """What one forward pass must produce for all of ``terms``."""
    needs = Needs()
    for term in terms:
        needs = needs | term.needs()
    return needs


def duplicate_names(specs: list[LossSpec], where: str) -> list[str]:
    """One problem per term name used more than once (metrics and weights are keyed by name)."""
    names = [spec.term_name for spec in specs]
    return [f"{where}.losses: two terms are named {name!r}; set a distinct 'name'"
            for name in sorted({n for n in names if names.count(n) > 1})]


def loss_problems(specs: list[LossSpec], model_options: Any, example: dict[str, Any] | None,
                  where: str) -> list[str]:
    """Each term's own checks against the model and, when given, one example of the data it
    will read; plus duplicate names. Reported before anything runs."""
    problems = duplicate_names(specs, where)
    for path, _, term in _new_terms(specs, where):
        found = term.check(model_options) + (term.check_example(example) if example is not None else [])
        problems += [f"{path}: {p}" for p in found]
    return problems


def build_terms(specs: list[LossSpec], state: State, where: str) -> dict[str, Loss]:
    """Instantiate a stage's loss terms, let them create their parameters, move them to device."""
    problems = duplicate_names(specs, where)
    if problems:
        raise state.recipe.error(problems)
    terms: dict[str, Loss] = {}
    for path, name, term in _new_terms(specs, where):
        try:
            term.setup(state)
        except ConfigError as exc:  # found only on the built model (Loss.setup): name the term and the file
            raise state.recipe.error([f"{path}: {p}" for p in exc.problems]) from None
        terms[name] = term.to(state.device)
    return terms


def term_error(state: State, name: str, exc: ConfigError) -> ConfigError:
    """A term's problem found once the model has run (e.g. an ``output`` key the model lacks), named
    like one its setup finds: ``stages.NAME.losses.TERM: ...`` in the recipe file."""
    where = state.recipe.stage_path(state.stage_index)
    specs = getattr(state.recipe.stages[state.stage_index].options, "losses", [])
    paths = dict(zip([spec.name for spec in specs], term_paths(specs, where), strict=True))
    return state.recipe.error([f"{paths.get(name, f'{where}.losses.{name}')}: {p}" for p in exc.problems])


def _new_terms(specs: list[LossSpec], where: str) -> Iterator[tuple[str, str, Loss]]:
    """Each term's recipe path (as problems name it), name and a new Loss built from its options.
    Lazily: :func:`build_terms` sets up each term before the next is built, the order of RNG draws
    that runs' numbers depend on."""
    for path, spec in zip(term_paths(specs, where), specs, strict=True):
        yield path, spec.term_name, spec.component()(spec.options)


def split_term(value: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A term's total and its parts (a Loss may return a dict of named parts)."""
    if isinstance(value, dict):
        return sum(value.values()), value  # type: ignore[return-value]  # a sum of tensors (from 0) is a tensor
    return value, {}


class TermWeights:
    """Each term's scheduled weight for the epoch, cut for a batch by the fallback rule."""

    def __init__(self, specs: list[LossSpec], state: State):
        self.specs = {s.term_name: s for s in specs}
        self.state = state
        self.fallbacks = {name: 0 for name in self.specs}

    def for_epoch(self, epoch: int) -> dict[str, float]:
        return {name: spec.weight_at(epoch) for name, spec in self.specs.items()}

    def effective(self, name: str, weight: float, value: float, count: bool = True) -> float:
        """The weight for this batch: ``weight * fallback_factor`` when the term is too large.

        ``count=False`` for a re-evaluation of a batch already counted (L-BFGS's line search).
        """
        spec = self.specs[name]
        # not "value <= threshold": NaN is not above it either, and the non-finite guard skips that batch
        if spec.fallback_threshold is None or weight == 0.0 or not value > spec.fallback_threshold:
            return weight
        cut = weight * spec.fallback_factor
        if count:
            self.fallbacks[name] += 1
            self.state.warnings.warn(
                f"fallback/{name}",
                f"loss term {name!r} = {value:.7g} > fallback_threshold {spec.fallback_threshold}; "
                f"weight cut to {cut:.3g} for this batch")
        return cut
