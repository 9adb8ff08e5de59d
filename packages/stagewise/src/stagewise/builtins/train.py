"""The built-in training stage ``stagewise.train`` and the base for plugins' training stages.

Subclasses change *what* the loop trains on without rewriting the loop: override
:meth:`TrainStage.train_batches` (e.g. batches from a cache of hidden states),
:meth:`TrainStage.forward_fn` (e.g. run only the upper layers) or :meth:`TrainStage.evaluate`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from stagewise.builtins.losses import CrossEntropyOptions
from stagewise.data.splits import size_of
from stagewise.engine.batches import batch_count, count_batches
from stagewise.engine.distributed import launched_world_size
from stagewise.engine.evaluate import evaluate
from stagewise.engine.loop import TrainLoop
from stagewise.engine.objective import loss_problems
from stagewise.engine.params import glob_problems, parameter_names_at
from stagewise.schema import check_options
from stagewise.specs import LossSpec
from stagewise.stage import Stage

if TYPE_CHECKING:
    from stagewise.data.splits import DataSplits
    from stagewise.engine.objective import Objective
    from stagewise.engine.state import State
    from stagewise.recipe import Recipe


def _default_losses() -> list[LossSpec]:
    return [LossSpec(use="stagewise.cross_entropy", options=CrossEntropyOptions())]


# The largest lr any stage takes: torch's optimizers turn lr (Adam: lr / (1 - beta1)) into a float32 step, and
# a larger one overflows it with a RuntimeError at the first step, after the stages before have run.
MAX_LR = 1e30


def lr_limit_check(lr: float, key: str = "lr") -> tuple[bool, str, str]:
    """The :func:`~stagewise.check_options` check that ``lr`` is at most :data:`MAX_LR`, for every stage with an
    optimizer; a NaN or infinite lr passes it, for the stage's own finiteness check to report."""
    return (not MAX_LR < lr < math.inf, key, f"must be <= {MAX_LR:g} (torch's optimizers overflow float32 above it), "
                                             f"got {lr}")


@dataclass
class TrainOptions:
    """Recipe keys of ``stagewise.train`` (and of stages built on it)."""

    train: list[str] = field(default_factory=lambda: ["*"])  # globs of parameter names that train
    freeze: list[str] = field(default_factory=list)  # globs taken out of `train` (frozen)
    losses: list[LossSpec] = field(default_factory=_default_losses)  # the objective's terms
    optimizer: Literal["adamw", "sgd", "lbfgs"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.01  # AdamW's decoupled decay / SGD's L2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW
    momentum: float = 0.0  # SGD
    lbfgs_max_iter: int = 20  # L-BFGS iterations per step
    lbfgs_history: int = 100  # L-BFGS history size
    schedule: Literal["constant", "warmup", "cosine", "plateau"] = "constant"
    warmup_steps: int = 0  # linear warmup (warmup and cosine schedules)
    min_lr: float = 0.0  # cosine floor
    plateau_factor: float = 0.5  # plateau: lr *= factor ...
    plateau_patience: int = 0  # ... after this many epochs without improvement of `monitor`
    max_epochs: int = 1
    max_steps_per_epoch: int | None = None  # cut epochs short (quick runs, tests); counts optimizer steps
    accumulate_batches: int = 1  # batches per optimizer step: the gradient of their mean loss (a larger batch)
    grad_clip: float | None = None  # max global gradient norm
    patience: int | None = None  # stop after this many epochs without improvement; None = never
    monitor: str = "val/loss"  # metric for early stopping, best weights and plateau
    mode: Literal["min", "max"] = "min"
    restore_best: bool = True  # end the stage with the best epoch's weights
    eval_split: str = "valid"  # split evaluated after each epoch; "" = no evaluation
    max_nonfinite: int = 10  # abort after this many NaN/Inf losses in a row
    ema_momentum: float | None = None  # keep an EMA target network (state.target_model)
    ema_momentum_end: float | None = None  # cosine schedule of the EMA momentum to this value

    def __post_init__(self) -> None:
        check_options(self.checks())

    def checks(self) -> list[tuple[bool, str | tuple[str, ...], str]]:
        """The ``(ok, key, message)`` value checks of :func:`stagewise.check_options`; a stage built on
        this one adds its own to these."""
        lr_ok = math.isfinite(self.lr) and self.lr >= 0
        return [
            (lr_ok, "lr", f"must be a finite number >= 0, got {self.lr}"),
            lr_limit_check(self.lr),
            (math.isfinite(self.weight_decay) and self.weight_decay >= 0, "weight_decay",
             f"must be a finite number >= 0, got {self.weight_decay}"),
            (all(0 <= b < 1 for b in self.betas), "betas", f"must be in [0, 1), got {self.betas}"),
            (len(self.betas) == 2, "betas", f"must be two numbers, got {self.betas}"),
            (math.isfinite(self.momentum) and self.momentum >= 0, "momentum",
             f"must be a finite number >= 0, got {self.momentum}"),
            (0 <= self.min_lr and (self.min_lr <= self.lr or not lr_ok), ("min_lr", "lr"),  # a bad lr is reported
             f"must be in [0, lr = {self.lr}], got {self.min_lr}"),
            (0 < self.plateau_factor < 1, "plateau_factor", f"must be in (0, 1), got {self.plateau_factor}"),
            (self.plateau_patience >= 0, "plateau_patience", f"must be >= 0, got {self.plateau_patience}"),
            (self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}"),
            (self.schedule != "warmup" or self.warmup_steps > 0, ("warmup_steps", "schedule"),
             "schedule 'warmup' needs warmup_steps > 0"),
            (self.lbfgs_max_iter >= 1, "lbfgs_max_iter", f"must be >= 1, got {self.lbfgs_max_iter}"),
            (self.lbfgs_history >= 1, "lbfgs_history", f"must be >= 1, got {self.lbfgs_history}"),
            (self.max_steps_per_epoch is None or self.max_steps_per_epoch >= 1, "max_steps_per_epoch",
             f"must be >= 1 (leave it unset for whole epochs), got {self.max_steps_per_epoch}"),
            (self.accumulate_batches >= 1, "accumulate_batches", f"must be >= 1, got {self.accumulate_batches}"),
            (self.optimizer != "lbfgs" or self.accumulate_batches == 1, ("accumulate_batches", "optimizer"),
             "cannot be more than 1 with optimizer 'lbfgs' (its line search re-evaluates the loss on one batch); "
             "remove accumulate_batches or use 'adamw' or 'sgd'"),
            (self.max_epochs >= 1, "max_epochs", f"must be >= 1, got {self.max_epochs}"),
            (self.max_nonfinite >= 1, "max_nonfinite", f"must be >= 1, got {self.max_nonfinite}"),
            (self.grad_clip is None or self.grad_clip > 0, "grad_clip", f"must be > 0, got {self.grad_clip}"),
            (self.optimizer != "lbfgs" or self.grad_clip is None, ("grad_clip", "optimizer"),
             "cannot be used with optimizer 'lbfgs' (its line search takes whole steps); remove one"),
            (self.patience is None or self.patience >= 1, "patience", f"must be >= 1, got {self.patience}"),
            (bool(self.losses), "losses", "at least one loss term is required"),
            (self.ema_momentum is None or 0 <= self.ema_momentum <= 1, "ema_momentum",
             f"must be in [0, 1], got {self.ema_momentum}"),
            (self.ema_momentum_end is None or 0 <= self.ema_momentum_end <= 1, "ema_momentum_end",
             f"must be in [0, 1], got {self.ema_momentum_end}"),
            (self.ema_momentum_end is None or self.ema_momentum is not None, ("ema_momentum_end", "ema_momentum"),
             "needs ema_momentum (the momentum at the stage's start); set both or neither"),
        ]


class TrainStage(Stage):
    """Train the selected parameters on a weighted sum of loss terms, evaluating every epoch.

    Features: parameter selection by glob, AdamW/SGD/L-BFGS, constant/warmup/cosine/plateau
    schedules, per-term weight schedules and fallback, gradient clipping and accumulation, a NaN/Inf guard,
    early stopping with best-weight restore, an EMA target network, mid-stage resume.
    Raises ConfigError before the run (see :meth:`check`) for globs matching no parameter of the
    model at this stage, two loss terms of one name, a ``monitor`` the stage cannot make,
    ``patience`` without evaluation and L-BFGS under torchrun; TrainingError after
    ``max_nonfinite`` non-finite losses in a row.
    """

    name = "stagewise.train"
    Options = TrainOptions

    def run(self, state: State) -> dict[str, Any]:
        return TrainLoop(self, state).run()

    # --- what subclasses change -------------------------------------------------------------

    def train_batches(self, state: State, epoch: int, start: int) -> Iterator[dict[str, Any]]:
        """The epoch's training batches from batch ``start`` on (deterministic per epoch)."""
        return state.batches("train", train=True, epoch=epoch, start=start)

    def batches_per_epoch(self, state: State) -> int:
        """How many batches :meth:`train_batches` yields in an epoch (before ``max_steps_per_epoch``)."""
        return count_batches(state, "train", train=True)

    def epoch_batches(self, state: State) -> int:
        """Batches the loop trains on in an epoch: :meth:`batches_per_epoch`, cut to ``max_steps_per_epoch``
        optimizer steps of ``accumulate_batches`` batches each."""
        n, o = self.batches_per_epoch(state), self.options
        return min(n, o.max_steps_per_epoch * o.accumulate_batches) if o.max_steps_per_epoch else n

    def steps_per_epoch(self, state: State) -> int:
        """Optimizer steps of an epoch: one per ``accumulate_batches`` of :meth:`epoch_batches`, and one for
        the batches left at the epoch's end."""
        return -(-self.epoch_batches(state) // self.options.accumulate_batches)

    def forward_fn(self, objective: Objective) -> Callable[[dict[str, Any]], dict[str, Any]]:
        """How a batch becomes model outputs; default: the model's forward pass."""
        return objective.outputs

    def check(self, recipe: Recipe, index: int, data: DataSplits) -> list[str]:
        """The split check, each loss term's own checks against the model at this stage and the
        training data, and every option the loop would otherwise refuse only after the run
        directory exists."""
        # a stage that draws its batches elsewhere (e.g. a cache) feeds its terms other examples
        own_batches = type(self).train_batches is TrainStage.train_batches
        where = recipe.stage_path(index)
        problems = super().check(recipe, index, data)
        problems += loss_problems(self.options.losses, recipe.model_options_at(index),
                                  data.example("train") if own_batches else None, where)
        problems += self._idle_epochs(where)
        problems += _batch_problems(recipe, size_of(data["train"]) if own_batches and "train" in data.names() else None)
        names = parameter_names_at(recipe, index, data)
        if names is not None:
            problems += glob_problems(names, self.options.train, self.options.freeze, where)
        return problems + self._option_problems(where)

    def _idle_epochs(self, where: str) -> list[str]:
        """Epochs in which every term has weight 0: nothing to train on (backward would fail)."""
        losses = self.options.losses
        # each weight is constant from start_epoch + ramp_epochs on: later epochs repeat the last one looked at
        horizon = min(self.options.max_epochs, 1 + max((s.start_epoch + s.ramp_epochs for s in losses), default=0))
        idle = [e for e in range(horizon) if all(spec.weight_at(e) == 0 for spec in losses)]
        if not idle:
            return []
        return [f"{where}.losses: every term has weight 0 in epoch(s) {', '.join(map(str, idle))} "
                f"(0-based; see each term's weight, cap and start_epoch), so nothing would train; give one "
                f"term a weight > 0 there or lower max_epochs"]

    def _option_problems(self, where: str) -> list[str]:
        o = self.options
        problems = self._monitor_problems(where)
        if o.patience is not None and not self.has_eval():
            problems.append(f'{where}.patience: early stopping compares `monitor` after each evaluation, but '
                            f'eval_split is "" (no evaluation); set eval_split or remove patience')
        world = launched_world_size()
        if o.optimizer == "lbfgs" and world > 1:
            problems.append(f"{where}.optimizer: 'lbfgs' cannot run under torchrun ({world} processes): its "
                            f"line search would follow each process's own loss, and the processes would "
                            f"wait on each other forever; use 'adamw' or 'sgd', or run in one process")
        return problems

    def _monitor_problems(self, where: str) -> list[str]:
        """``monitor`` must be an epoch metric of the stage wherever it is read: after each
        evaluation (best epoch, early stopping) and by the ``plateau`` schedule. The names of
        ``val/`` metrics depend on the terms' evaluation, so only their prefix is checked here."""
        o = self.options
        if not self.has_eval() and o.schedule != "plateau":
            return []  # monitor is never read
        scope, _, rest = o.monitor.partition("/")
        # a term's train/ metrics exist only in epochs where its weight is not 0: from the first one
        train = ["loss", "lr", "nonfinite", *(spec.name for spec in o.losses if spec.weight_at(0) != 0.0)]
        if (scope == "train" and rest.split("/")[0] in train) or (scope == "val" and rest and self.has_eval()):
            return []
        made = ", ".join(f"train/{k}" for k in train)
        if scope == "val" and rest:
            return [f'{where}.monitor: {o.monitor!r} needs evaluation, but eval_split is "" and '
                    f"schedule 'plateau' reads monitor every epoch; set eval_split or monitor one of {made}"]
        evaluated = "val/<metric> (e.g. val/loss) or " if self.has_eval() else ""
        return [f"{where}.monitor: {o.monitor!r} is not a metric this stage makes in every epoch; use "
                f"{evaluated}one of {made} (a term's name may be followed by /weight, /weighted, ...)"]

    def has_eval(self) -> bool:
        return bool(self.options.eval_split)

    def evaluate(self, state: State, objective: Objective) -> dict[str, float]:
        """Metrics after an epoch: every loss term on ``eval_split``, prefixed ``val/``."""
        if not self.has_eval():
            return {}
        terms = objective.loss_terms()
        split = self.options.eval_split  # a bar: a large validation split takes a while after each epoch
        batches = state.batches(split, desc=f"evaluating {split}")
        return evaluate(state, terms, batches, "val", self.forward_fn(objective))


def _batch_problems(recipe: Recipe, n: int | None) -> list[str]:
    """A global batch too small to give every process a share (the processes would wait forever for a
    rank with no batch), or a train split of ``n`` examples (None: the stage reads other batches) too
    small for one training batch, so the stage would train nothing. Worded without the stage: each
    training stage finds it alike, and it is reported once."""
    spec, world = recipe.data, launched_world_size()
    if spec.batch_size < world:
        return [f"data.batch_size: {spec.batch_size} is smaller than the {world} processes torchrun launched, each "
                f"of which takes a share of every batch; set data.batch_size to at least {world}"]
    if n is None or batch_count(n, spec.batch_size, drop_last=spec.drop_last, world=world, every_rank=True):
        return []
    if spec.drop_last and n >= world:
        return [f"data.batch_size: the train split's {n} examples make no full batch of {spec.batch_size} with "
                f"data.drop_last = true, so stagewise.train would train nothing; lower data.batch_size to at "
                f"most {n}, set data.drop_last = false or give more training data"]
    return [f"data: the train split has {n} examples, fewer than the {world} processes that each need one, so "
            f"stagewise.train would train nothing; give more training data or launch fewer processes"]
