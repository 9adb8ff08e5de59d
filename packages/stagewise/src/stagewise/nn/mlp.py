"""A plain multi-layer perceptron for tabular and flattened inputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, cast

import torch
from torch import nn

from stagewise.data.splits import DataSplits
from stagewise.schema import check_options


@dataclass
class MLPOptions:
    """The recipe's ``[model]`` keys of ``stagewise.mlp``."""

    hidden: list[int] = field(default_factory=lambda: [64, 64])  # widths of the hidden layers
    activation: Literal["relu", "gelu", "tanh"] = "relu"
    dropout: float = 0.0
    n_outputs: int | None = None  # default: data.info["n_outputs"] (classes or targets)

    def __post_init__(self) -> None:
        # checked when the recipe loads, as the transformer's: torch would refuse them only when the model is
        # built, after the data has loaded
        check_options([
            (all(width >= 1 for width in self.hidden), "hidden", f"every width must be >= 1, got {self.hidden}"),
            (0 <= self.dropout < 1, "dropout", f"must be in [0, 1), got {self.dropout}"),
            (self.n_outputs is None or self.n_outputs >= 1, "n_outputs",
             f"must be >= 1 (leave it unset for the data's n_outputs), got {self.n_outputs}"),
        ])


class MLP(nn.Module):
    """Linear → activation (→ dropout) per hidden width, then a linear output layer.

    ``from_recipe`` reads the input width from ``data.info["n_features"]``. Integer and bool inputs are
    converted to the weights' type.
    """

    Options = MLPOptions

    def __init__(self, n_features: int, n_outputs: int, o: MLPOptions):
        super().__init__()
        act = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}[o.activation]
        layers: list[nn.Module] = []
        width = n_features
        for h in o.hidden:
            layers += [nn.Linear(width, h), act()] + ([nn.Dropout(o.dropout)] if o.dropout else [])
            width = h
        layers.append(nn.Linear(width, n_outputs))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # (B, F)
        if not x.is_floating_point():  # integer features, e.g. counts or a .npz's unscaled pixels
            x = x.to(cast(nn.Linear, self.net[0]).weight.dtype)
        return self.net(x)  # (B, n_outputs)

    @classmethod
    def from_recipe(cls, options: MLPOptions, data: DataSplits) -> MLP:
        missing = [k for k in ("n_features", "n_outputs") if k not in data.info]
        if "n_outputs" in missing and options.n_outputs is not None:
            missing.remove("n_outputs")
        if missing:
            raise ValueError(f"model stagewise.mlp needs data.info {missing}; this dataset does not "
                             "provide them (set model.n_outputs, or use a tabular dataset)")
        needed = data.info.get("n_outputs")
        if options.n_outputs is not None and needed is not None and options.n_outputs < needed:
            # labels >= n_outputs (or too few values) would fail only in the loss, mid-training
            raise ValueError(f"n_outputs = {options.n_outputs} is less than the data's n_outputs = {needed} "
                             f"(classes: the largest label + 1, or values per target); raise model.n_outputs "
                             f"to at least {needed} or leave it unset")
        return cls(data.info["n_features"], options.n_outputs or data.info["n_outputs"], options)
