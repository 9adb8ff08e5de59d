"""The Loss base class: one named term of a stage's objective.

The engine composes ``L_total = sum_i w_i(t) * L_i`` from a stage's terms, applying each
term's weight schedule and fallback, and logs every term. A Loss is a ``torch.nn.Module``, so a
term may own parameters (an auxiliary head, a Koopman operator): they are trained with the
model and saved in checkpoints.

``forward(outputs, batch, state)`` returns a scalar tensor, or a dict of named scalar tensors
whose sum is the term (each part is logged as ``train/<term>/<part>``). ``needs()`` tells the
engine what the model must return (hidden states, logits at an exit layer).
``eval_sums`` gives exact sums for evaluation metrics, aggregated over the whole split.

Example::

    class L1(stagewise.Loss):
        name = "myplugin.l1"

        def forward(self, outputs, batch, state):
            return (outputs["logits"] - batch["target"]).abs().mean()
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F

from stagewise.errors import PluginError
from stagewise.schema import NoOptions

if TYPE_CHECKING:
    from stagewise.engine.state import State


@dataclass(frozen=True)
class Needs:
    """What a forward pass must produce: logits at these exit layers, all hidden states."""

    exit_layers: frozenset[int] = frozenset()
    hidden: bool = False

    def __or__(self, other: Needs) -> Needs:
        return Needs(self.exit_layers | other.exit_layers, self.hidden or other.hidden)


class Loss(torch.nn.Module):
    """A named loss term. Subclasses set ``name``/``Options`` and implement ``forward``."""

    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions

    def __init__(self, options: Any = None):
        super().__init__()
        self.options = options if options is not None else self.Options()

    def setup(self, state: State) -> None:
        """Called once when the stage starts, before the optimizer is built: create parameters
        that depend on the model (e.g. its width) here. A problem only the built model shows
        (what :meth:`check` could not see from the options): ``raise stagewise.ConfigError([...])``
        with plain problems; the engine names the term (``stages.NAME.losses.TERM: ...``) and the recipe file,
        as it does for one that :meth:`forward` or :meth:`eval_sums` raises once the model has run."""

    def needs(self) -> Needs:
        return Needs()

    def check(self, model_options: Any) -> list[str]:
        """Problems with this term for a model with these options, reported before anything
        runs. The default: every exit layer it needs exists (for models with ``n_layer``)."""
        n_layer = getattr(model_options, "n_layer", None)
        if n_layer is None:
            return []
        return [f"at_layer {layer} is outside the model's layers 1..{n_layer}"
                for layer in sorted(self.needs().exit_layers) if not 1 <= layer <= n_layer]

    def check_example(self, example: dict[str, Any]) -> list[str]:
        """Problems with the data this term will read, from one example of it (a dict of
        tensors without the batch axis), reported before anything runs: a missing key, a wrong
        dtype. Default: none."""
        return []

    def forward(self, outputs: dict[str, Any], batch: dict[str, Any], state: State) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must implement forward()")

    def eval_sums(self, outputs: dict[str, Any], batch: dict[str, Any], state: State) -> dict[str, tuple[float, float]]:
        """``{metric: (sum, count)}`` for one evaluation batch; default: the batch mean loss."""
        value = check_value(self, self(outputs, batch, state))
        value = sum(value.values()) if isinstance(value, dict) else value
        n = batch_size(batch)
        return {"loss": (float(value) * n, float(n))}

    def summarize(self, means: dict[str, float]) -> dict[str, float]:
        """Turn aggregated means into reported metrics (e.g. add perplexity)."""
        return means


def check_value(loss: Loss, value: Any) -> Any:
    """``value`` when it is what ``loss.forward`` must return: a scalar (one-element) tensor or a
    dict of them; else a PluginError naming the loss. No device sync: shapes only."""
    what = _not_scalar(value)
    if what is not None:
        raise PluginError(f"loss {loss.name!r} returned {what}; Loss.forward must return a scalar tensor "
                          f"(reduce it, e.g. with .mean()) or a dict of named scalar tensors")
    return value


def _not_scalar(value: Any) -> str | None:
    """What a Loss.forward returned, as :func:`check_value`'s error names it, when it is not a scalar
    tensor or a dict of them; None when it is."""
    if isinstance(value, dict) and not value:  # no total to train on: the sum of no parts is the int 0
        return "a dict of no parts"
    for part, v in value.items() if isinstance(value, dict) else [(None, value)]:
        if not (isinstance(v, torch.Tensor) and v.numel() == 1):
            what = f"a tensor of shape {tuple(v.shape)}" if isinstance(v, torch.Tensor) else f"a {type(v).__name__}"
            return what if part is None else f"part {part!r}: {what}"
    return None


def batch_size(batch: dict[str, Any]) -> int:
    """The examples a batch holds: its first tensor's length. Under torchrun and with ``accumulate_batches``
    each batch's loss is weighted by it, so a batch puts first the tensor whose rows its loss averages over."""
    first = next(v for v in batch.values() if isinstance(v, torch.Tensor))
    return int(first.shape[0])


def perplexity(mean_nll: float) -> float:
    """exp(mean negative log-likelihood), capped so huge losses stay finite JSON."""
    return math.exp(min(mean_nll, 700.0))


def token_nll(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood of logits (..., V) at target (...), shaped like target.

    Flattened so the log-softmax runs over the last, contiguous axis: on CPU that kernel is
    several times faster than cross-entropy with the classes on axis 1 (``logits.transpose(1, 2)``).
    """
    flat = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), reduction="none")
    return flat.view(target.shape)
