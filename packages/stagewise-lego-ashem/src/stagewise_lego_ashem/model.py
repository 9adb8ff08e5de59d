"""``lego_ashem.deep_supervision_transformer``: core's transformer with an early exit.

The seed's ``DeepSupervisionTransformer`` (``../shared/seeds/lego-ashem.md``): blocks of layers
whose logits are available after any layer through the one shared output head (core's
``stagewise.transformer`` already gives that: ``exit_layers`` and ``logits_from_hidden``), plus
the two routing settings of the seed, ``exit_layer`` and ``routing_threshold``. The threshold is a
buffer, so it travels with the model's state dict (checkpoints, ``grow``); ``lego_ashem.mine``
sets it from the calibrated router. An optional exit probe (a linear classifier on the exit
hidden state, as in CALM and LayerSkip) predicts "the exit layer's argmax equals the last
layer's", so a routed token can be scored without a full-vocabulary softmax at the exit.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Self

import torch
from torch import nn

from stagewise.nn.transformer import TransformerConfig, TransformerLM, TransformerOptions

if TYPE_CHECKING:
    from stagewise.data.splits import DataSplits


@dataclass(kw_only=True)
class DeepSupervisionOptions(TransformerOptions):
    """The recipe's ``[model]`` keys: core's transformer keys plus the routing settings."""

    exit_layer: int = 2  # blocks run before the early exit (1..n_layer); the seed's exit_layer
    routing_threshold: float | None = None  # exit when confidence >= this; unset: lego_ashem.mine calibrates it
    exit_probe: bool = False  # add a learned exit classifier (trained by lego_ashem.train_exit_probe)

    def checks(self) -> list[tuple[bool, str | tuple[str, ...], str]]:
        in_model = 1 <= self.exit_layer <= self.n_layer or self.n_layer < 1  # a bad n_layer is reported
        unset_as_nan = self.routing_threshold is not None and math.isnan(self.routing_threshold)
        return [*super().checks(), (in_model, ("exit_layer", "n_layer"),
                                    f"{self.exit_layer} is outside the model: it must be in 1..n_layer = "
                                    f"1..{self.n_layer} (blocks run before the exit)"),
                (not unset_as_nan, "routing_threshold", "NaN: give a number, or leave the key out and "
                                                        "lego_ashem.mine calibrates it")]


class DeepSupervisionTransformer(TransformerLM):
    """``TransformerLM`` with ``exit_layer``, a ``routing_threshold`` buffer (NaN: not set) and,
    with ``exit_probe``, a parameter ``exit_probe.weight``/``.bias`` (C -> 1 logit)."""

    name = "lego_ashem.deep_supervision_transformer"
    Options = DeepSupervisionOptions

    def __init__(self, config: TransformerConfig, *, exit_layer: int | None = None,
                 routing_threshold: float | None = None, exit_probe: bool = False):
        super().__init__(config)  # same initialisation (and RNG use) as core's transformer
        self._set_routing(config.n_layer if exit_layer is None else exit_layer, routing_threshold, exit_probe)

    @classmethod
    def from_recipe(cls, options: TransformerOptions, data: DataSplits) -> Self:
        # the engine passes cls.Options; core's type (the supertype's argument) lacks the routing settings
        if not isinstance(options, DeepSupervisionOptions):
            raise TypeError(f"{cls.name} is built from DeepSupervisionOptions (its [model] keys, with exit_layer), "
                            f"got {type(options).__name__}")
        # core's from_recipe checks the data (vocab_size, seq_len) and builds cls(config)
        base = TransformerOptions(**{f.name: getattr(options, f.name) for f in dataclasses.fields(TransformerOptions)})
        model = super().from_recipe(base, data)
        model._set_routing(options.exit_layer, options.routing_threshold, options.exit_probe)
        return model

    def _set_routing(self, exit_layer: int, routing_threshold: float | None, exit_probe: bool) -> None:
        if not 1 <= exit_layer <= self.config.n_layer:
            raise ValueError(f"exit_layer {exit_layer} is outside the model: valid exit layers are "
                             f"1..{self.config.n_layer}")
        self.exit_layer = exit_layer
        threshold = math.nan if routing_threshold is None else float(routing_threshold)
        self.routing_threshold: torch.Tensor  # a buffer, declared for type checkers (nn.Module says Tensor | Module)
        self.register_buffer("routing_threshold", torch.tensor(threshold, dtype=torch.float64))  # (), checkpointed
        self.exit_probe: nn.Linear | None = nn.Linear(self.config.n_embd, 1) if exit_probe else None

    @property
    def threshold(self) -> float | None:
        """The routing threshold as a float, or None when it has not been set or calibrated."""
        value = float(self.routing_threshold)
        return None if math.isnan(value) else value

    def set_threshold(self, value: float) -> None:
        self.routing_threshold.fill_(value)

    def logits_from_hidden(self, h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The shared head (final norm, projection); with ``out`` (N, V) and h (N, C) the
        projection writes into ``out`` (no autograd: out= kernels have no backward)."""
        if out is None or torch.is_grad_enabled():
            logits = super().logits_from_hidden(h)
            return logits if out is None else out.copy_(logits)
        return torch.mm(self.norm(h), self.head.weight.t(), out=out)  # the head has no bias

    def exit_hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> the residual stream after ``exit_layer`` blocks, (B, T, C)."""
        return self.run_layers(self.embed(idx), 0, self.exit_layer)


def deep_supervision(model: nn.Module) -> DeepSupervisionTransformer:
    """``model`` as the transformer lego_ashem's stages run on: each stage's check() refuses another
    ``[model] use``, so a different model here comes from a caller outside a recipe."""
    if not isinstance(model, DeepSupervisionTransformer):
        raise TypeError(f"lego_ashem needs a {DeepSupervisionTransformer.name} model ([model] use = "
                        f"\"{DeepSupervisionTransformer.name}\"), got {type(model).__name__}")
    return model
