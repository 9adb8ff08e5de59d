"""Core loss terms: cross-entropy (classification, language modelling, multi-head) and MSE."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from stagewise.data.splits import DataError
from stagewise.errors import ConfigError
from stagewise.loss import Loss, Needs, perplexity
from stagewise.schema import check_options


@dataclass
class OutputOptions:
    """Where a loss reads its prediction and target."""

    output: str | None = None  # key in the model outputs (dotted for nested dicts); default "logits" or "output"
    target: str = "target"  # key in the batch
    at_layer: int | None = None  # use the logits of this exit layer (models with exits, e.g. the transformer)


def prediction(outputs: dict[str, Any], o: OutputOptions) -> torch.Tensor:
    """The tensor a loss compares with the target, chosen by ``output``/``at_layer``."""
    if o.at_layer is not None:
        return outputs["exit_logits"][o.at_layer]
    if o.output is None:
        return outputs["logits"] if "logits" in outputs else outputs["output"]
    node: Any = outputs
    for part in o.output.split("."):
        if not isinstance(node, dict) or part not in node:  # known only once the model has run
            keys = ", ".join(map(repr, node)) if isinstance(node, dict) else "none: it is a tensor"
            raise ConfigError([f"output {o.output!r}: the model's outputs have no {part!r} "
                               f"(keys there: {keys}); set the term's output to one of them"])
        node = node[part]
    return node


@dataclass
class CrossEntropyOptions(OutputOptions):
    ignore_index: int = -100  # targets with this value are not counted
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        check_options([(0 <= self.label_smoothing <= 1, "label_smoothing",
                         f"must be in [0, 1], got {self.label_smoothing}")])


class _OutputLoss(Loss):
    """A loss that reads one prediction, chosen by ``OutputOptions``."""

    def needs(self) -> Needs:
        layer = self.options.at_layer
        return Needs(exit_layers=frozenset([layer]) if layer is not None else frozenset())

    def check_example(self, example: dict[str, Any]) -> list[str]:
        if self.options.target not in example:
            return [f"target {self.options.target!r} is not in the data's examples, which hold: "
                    f"{', '.join(map(repr, example))}; set this term's target to one of them"]
        return []


class CrossEntropy(_OutputLoss):
    """Mean cross-entropy over every target (token, example or head); reports loss, ppl, acc."""

    name = "stagewise.cross_entropy"
    Options = CrossEntropyOptions

    def forward(self, outputs, batch, state):
        logits, target = self._flat(outputs, batch)
        return self._nll(logits, target, label_smoothing=self.options.label_smoothing)

    def eval_sums(self, outputs, batch, state):
        logits, target = self._flat(outputs, batch)
        keep = target != self.options.ignore_index
        nll = self._nll(logits, target, reduction="sum")
        correct = ((logits.argmax(-1) == target) & keep).sum()  # a mask, not indexing: no copies
        n = float(keep.sum())
        return {"loss": (float(nll), n), "acc": (float(correct), n)}

    def summarize(self, means):
        return {**means, "ppl": perplexity(means["loss"])} if "loss" in means else means

    def check_example(self, example: dict[str, Any]) -> list[str]:
        target = example.get(self.options.target)
        if isinstance(target, torch.Tensor) and target.is_floating_point():
            return [self._float_targets(target.dtype)]
        return super().check_example(example)

    def _float_targets(self, dtype: torch.dtype) -> str:
        return (f"{self.name} needs class labels, but the data's {self.options.target!r} holds {dtype} "
                f"values; for class labels set data.target_dtype = \"long\" (stagewise.csv, "
                f"stagewise.jsonl), for regression use losses = [{{ use = \"stagewise.mse\" }}]")

    def _nll(self, logits: torch.Tensor, target: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        classes = logits.shape[-1]
        if logits.device.type != "cpu":  # there a bad label is a device-side assert, which ends the process
            outside = (target != self.options.ignore_index) & ((target < 0) | (target >= classes))
            if bool(outside.any()):
                raise self._label_error(f"Target {int(target[outside][0])} is out of bounds.", classes)
        try:
            return F.cross_entropy(logits, target, ignore_index=self.options.ignore_index, **kwargs)
        except IndexError as exc:  # a label outside the classes: torch names neither the loss nor the fix
            raise self._label_error(str(exc), classes) from None

    def _label_error(self, problem: str, classes: int) -> DataError:
        return DataError(f"{self.name}: {problem} The batch's {self.options.target!r} must hold class labels "
                         f"0..{classes - 1}, or ignore_index = {self.options.ignore_index} for targets to skip; "
                         f"check the data's labels, the model's number of outputs and this term's ignore_index")

    def _flat(self, outputs, batch):
        logits = prediction(outputs, self.options)
        target = batch[self.options.target]
        if target.is_floating_point():  # .long() would truncate 1.5 to 1 and train on nonsense
            raise DataError(self._float_targets(target.dtype))
        return logits.reshape(-1, logits.shape[-1]), target.reshape(-1).long()


class MSE(_OutputLoss):
    """Mean squared error between a prediction and a float target."""

    name = "stagewise.mse"
    Options = OutputOptions

    def check_example(self, example: dict[str, Any]) -> list[str]:
        target = example.get(self.options.target)
        if isinstance(target, torch.Tensor) and not target.is_floating_point():
            return [f"{self.name} needs float targets, but the data's {self.options.target!r} holds {target.dtype} "
                    f"values (class labels or token ids): use stagewise.cross_entropy, or for regression "
                    f"set data.target_dtype = \"float\" (stagewise.csv, stagewise.jsonl)"]
        return super().check_example(example)

    def forward(self, outputs, batch, state):
        return F.mse_loss(*self._pair(outputs, batch))

    def eval_sums(self, outputs, batch, state):
        pred, target = self._pair(outputs, batch)
        return {"loss": (float(((pred - target) ** 2).sum()), float(pred.numel()))}

    def _pair(self, outputs, batch):
        """The prediction and the target, shaped alike, in the prediction's dtype but at least float32: a bf16
        run's (``run.precision``) bfloat16 prediction is compared in float32, not with targets rounded to
        bfloat16's 3 significant digits."""
        pred = prediction(outputs, self.options)
        pred = pred.to(torch.promote_types(pred.dtype, torch.float32))  # float32 and float64: the tensor itself
        return pred, batch[self.options.target].to(pred.dtype).reshape(pred.shape)
