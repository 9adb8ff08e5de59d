"""The training loop every training stage runs (see the drawing in :mod:`stagewise.events`).

``TrainLoop`` owns the how: optimizer and schedule, loss-term weights and fallback, gradient
clipping, the non-finite guard, the EMA target, evaluation, early stopping with best-weight
restore, progress, logging and checkpoints. The stage (``stagewise.TrainStage`` or a subclass)
declares the what: options, where batches come from and how outputs are computed.
"""

from __future__ import annotations

import math
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from itertools import chain, islice
from typing import TYPE_CHECKING, Any

import torch

from stagewise.engine import ema
from stagewise.engine.checkpoint import set_rng_state
from stagewise.engine.distributed import all_reduce_sums
from stagewise.engine.guards import NonFiniteGuard
from stagewise.engine.objective import Objective, TermWeights, build_terms, split_term
from stagewise.engine.optim import build_optimizer, build_scheduler
from stagewise.engine.params import select_parameters
from stagewise.engine.precision import autocast
from stagewise.engine.resumable import (
    counts_problems,
    number_problems,
    optimizer_problems,
    plain_problems,
    same_types,
    schedule_problems,
    tensors_problems,
)
from stagewise.engine.signals import StopSignal, requested, stop_point, vote, votes_and_count
from stagewise.errors import PluginError, TrainingError
from stagewise.events import Event
from stagewise.loss import batch_size

if TYPE_CHECKING:
    from stagewise.builtins.train import TrainStage
    from stagewise.engine.state import State


# what a mid-stage checkpoint holds beside ``loop`` that :meth:`TrainLoop._restore` reads (save() writes them)
_SAVED = ("optimizer", "scheduler", "terms", "best_state", "target", "guard", "fallbacks")


@dataclass
class Position:
    """Where the loop is (epoch, next batch), its early-stopping record and this epoch's running
    sums. A mid-stage checkpoint holds it as its ``loop`` table, so the field names are checkpoint
    keys."""

    epoch: int = 0
    batch: int = 0  # next batch of the epoch
    best: float | None = None
    best_epoch: int = -1
    bad_epochs: int = 0
    stopped_early: bool = False
    sums: dict[str, float] = field(default_factory=dict)  # running train sums of this epoch
    best_metrics: dict[str, Any] = field(default_factory=dict)
    last_metrics: dict[str, Any] = field(default_factory=dict)


def position_problems(loop: Any) -> list[str]:
    """Where a checkpoint's ``loop`` table is not a :class:`Position` as :meth:`TrainLoop.save` writes it
    (the loop checks the epoch and batch against the stage: :meth:`TrainLoop._resume_problems`)."""
    fresh = asdict(Position())
    if not isinstance(loop, dict) or loop.keys() != fresh.keys():
        return [f"loop: expected a table of {', '.join(fresh)}"]
    counts = ("epoch", "batch", "best_epoch", "bad_epochs", "stopped_early")
    problems = same_types({k: loop[k] for k in counts}, {k: fresh[k] for k in counts}, "loop")
    problems += [] if loop["best"] is None else number_problems(loop["best"], "loop.best")
    sums = loop["sums"]
    if not (isinstance(sums, dict) and all(isinstance(k, str) and type(v) in (int, float) for k, v in sums.items())):
        problems.append("loop.sums: expected a table of numbers")
    for key in ("best_metrics", "last_metrics"):
        if not isinstance(loop[key], dict):
            problems.append(f"loop.{key}: expected a table")
        problems += plain_problems(loop[key], f"loop.{key}")
    return problems


class TrainLoop:
    """One training stage's loop over epochs and batches: an optimizer step per ``accumulate_batches``
    batches (the gradient of their mean loss), and one for the batches left at an epoch's end."""

    def __init__(self, stage: TrainStage, state: State):
        self.stage, self.state, self.o = stage, state, stage.options
        # as the recipe's problems name the stage: stages.NAME, or stages[i] where --set cannot address NAME
        self.where = where = state.recipe.stage_path(state.stage_index)
        self.terms = build_terms(self.o.losses, state, where)
        state.terms = self.terms  # event hooks reach the terms through the state (e.g. a refresh after each step)
        self.objective = Objective(state.model, self.terms, state)
        selected = select_parameters(state.model, self.o.train, self.o.freeze, where, state.recipe)
        groups = [[p for _, p in selected], *(list(term.parameters()) for term in self.terms.values())]
        # grad_clip bounds the model's gradient norm and each term's own parameters' apart, so that
        # an auxiliary term's modules (e.g. Koopman operators) never shrink the model's step
        self.clip_groups = [group for group in groups if group]
        self.params = [p for group in groups for p in group]  # what the optimizer steps
        self.optimizer = build_optimizer(self.params, self.o)
        self.epoch_batches = stage.epoch_batches(state)  # what an epoch trains on, max_steps_per_epoch applied
        self.steps_per_epoch = stage.steps_per_epoch(state)  # optimizer steps
        if self.steps_per_epoch == 0:  # e.g. a stage's own selection of examples came out empty
            use = state.recipe.stages[state.stage_index].use
            raise TrainingError(f"{where} ({use}): an epoch has no batch to train on, so the stage would "
                                f"train nothing; give it more examples (or a smaller data.batch_size)")
        self.total_steps = self.steps_per_epoch * self.o.max_epochs  # the stage's: LR schedule and EMA momentum
        self.scheduler = build_scheduler(self.optimizer, self.o, self.total_steps)
        self.weights = TermWeights(self.o.losses, state)
        self.guard = NonFiniteGuard(self.o.max_nonfinite, state.warnings)
        self.ddp = self._wrap_distributed()
        if self.o.ema_momentum is not None:
            state.target_model = ema.make_target(state.model)
        self.pos = Position()
        self.best_state: dict[str, torch.Tensor] | None = None
        self.rng_to_set: dict[str, Any] | None = None  # a resumed stage's saved RNG state, until it is set
        self.epoch_started = 0.0  # perf_counter() at the epoch's start, moved back on a mid-epoch resume
        self.stop_votes = 0  # under torchrun: the processes' votes to stop seen in the batches' sums so far
        if state.resume is not None:
            self._restore(state.resume)

    # --- the loop -------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        state, o = self.state, self.o
        while self.pos.epoch < o.max_epochs and not self.pos.stopped_early:
            state.epoch = self.pos.epoch
            if self.pos.batch == 0:
                self._resume_rng()  # resumed at an epoch's start: its hooks and batches draw from here
                state.fire(Event.BEFORE_EPOCH)
                self.epoch_started = time.perf_counter()
            self._train_epoch()
            self._end_epoch(time.perf_counter() - self.epoch_started)
        if o.restore_best and self.best_state is not None:
            self._load_model_state(self.best_state)
        state.epochs_run = self.pos.epoch
        final = self.pos.best_metrics if (o.restore_best and self.pos.best_metrics) else self.pos.last_metrics
        return {**final, "train/best_epoch": self.pos.best_epoch, "train/stopped_early": self.pos.stopped_early}

    def _train_epoch(self) -> None:
        state, pos = self.state, self.pos
        weights = self.weights.for_epoch(pos.epoch)
        state.term_weights = dict(weights)  # a copy: hooks read it, the loop keeps its own
        active = {n for n, w in weights.items() if w != 0.0}
        total = self.epoch_batches
        # islice: the epoch's last step draws no further batch from the stage
        batches = islice(self.stage.train_batches(state, pos.epoch, pos.batch), total - pos.batch)
        bar = state.progress(batches, desc=f"epoch {pos.epoch + 1}/{self.o.max_epochs}", total=total,
                             initial=pos.batch)  # counts batches
        every = state.recipe.run.checkpoint_every_n_steps
        drawn = iter(bar)
        for batch in drawn:
            # resumed mid-epoch: the new batch iterator has drawn its seed, as the epoch's first
            # iterator had before the checkpoint, so the saved state is set only now
            self._resume_rng()
            # the step's other batches (accumulate_batches > 1), drawn one by one as it trains on them
            rest = islice(drawn, min(self.o.accumulate_batches, total - pos.batch) - 1)
            loss = self._step(batch, rest, weights, active)
            if not bar.disable:  # a hidden bar (no terminal, --quiet) shows no loss: skip formatting it
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            # between optimizer steps only, so a resumed run takes the same ones; after the last, _end_epoch saves
            stopping = self._asked_to_stop()
            if pos.batch < total and (stopping or every and state.step % every == 0):
                self.save()
                if stopping:
                    raise StopSignal(requested(), f"after step {state.step} of stage {state.stage_name!r}")
        bar.close()

    def _asked_to_stop(self) -> bool:
        """Whether the run is to stop after this step: asked by a signal (see :mod:`stagewise.engine.signals`);
        under torchrun, as one process voted in a sum of this step's, which every process saw."""
        return self.stop_votes > 0 if self.state.dist.enabled else requested() is not None

    def _step(self, batch: dict[str, Any], rest: Iterator[dict[str, Any]], weights: dict[str, float],
              active: set[str]) -> float:
        """One optimizer step on ``batch`` and the ``rest`` of its batches; returns its loss."""
        state, o = self.state, self.o
        state.fire(Event.BEFORE_STEP, batch=batch)  # once per step: with its first batch
        lr = self.optimizer.param_groups[0]["lr"]  # this step's: the scheduler steps after it
        if o.optimizer == "lbfgs":  # one batch a step (check() refuses accumulate_batches with it)
            record: dict[str, Any] = {}
            value = self._lbfgs_step(batch, weights, active, record)
            trained = [(value, record)] if self._checked(value, record) else []
            self.pos.batch += 1
        else:
            self._clear_grads()
            value, trained = (self._backward(batch, weights, active) if o.accumulate_batches == 1
                              else self._accumulate(batch, rest, weights, active))
            if trained:
                self._drop_unweighted_grads(trained)
                if o.grad_clip is not None:
                    for group in self.clip_groups:
                        torch.nn.utils.clip_grad_norm_(group, o.grad_clip)
                self.optimizer.step()
        if trained:
            self._after_update(value, lr, trained)
        state.fire(Event.AFTER_STEP, loss=value)
        return value

    def _backward(self, batch: dict[str, Any], weights: dict[str, float],
                  active: set[str]) -> tuple[float, list[tuple[float, dict[str, Any]]]]:
        """Backpropagate one batch's loss (accumulate_batches = 1); returns the loss and the batch's (loss,
        record), or no record when the guard skips the batch."""
        record: dict[str, Any] = {}
        total, value, _ = self._total(batch, weights, active, record)
        ok = self._checked(value, record)
        if ok and total.requires_grad:  # not when fallbacks cut every term to 0: nothing to backpropagate
            total.backward()
        self.pos.batch += 1
        return value, [(value, record)] if ok else []

    def _accumulate(self, batch: dict[str, Any], rest: Iterator[dict[str, Any]], weights: dict[str, float],
                    active: set[str]) -> tuple[float, list[tuple[float, dict[str, Any]]]]:
        """Backpropagate each of the step's batches' loss summed over its examples, then divide the gradients
        by the step's examples: the gradient of the mean loss over all of them, however unevenly the batches
        split. Returns the step's loss (that mean) and each batch's (loss, record); at a non-finite loss the
        guard skips the whole step (counted once; its other batches are drawn, not trained on): no records.
        Under DDP only the step's last batch all-reduces the gradients."""
        last = min(self.o.accumulate_batches, self.epoch_batches - self.pos.batch) - 1
        trained: list[tuple[float, dict[str, Any]]] = []
        examples, loss_sum = 0, 0.0
        for i, micro in enumerate(chain((batch,), rest)):
            record: dict[str, Any] = {}
            with self._no_sync(i < last):
                total, value, n = self._total(micro, weights, active, record, summed=True)
                if not math.isfinite(value):
                    self._checked(value, record)  # counts the skipped step, or raises
                    self.pos.batch += 1 + sum(1 for _ in rest)
                    return value, []
                if total.requires_grad:  # no term weighted in this batch: it adds nothing to the step's gradient
                    total.backward()
            self.pos.batch += 1
            trained.append((value, record))
            examples, loss_sum = examples + n, loss_sum + n * value
        mean = loss_sum / examples
        if not self._checked(mean, {}):  # finite: the guard's count of skips in a row starts again
            return mean, []
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads:  # none when no trained parameter is in the loss's graph: the step changes nothing
            torch._foreach_div_(grads, float(examples))
        return mean, trained

    def _no_sync(self, local: bool) -> AbstractContextManager[Any]:
        """DDP's ``no_sync()`` for a batch whose gradients stay ``local`` (all but a step's last), else nothing."""
        return self.ddp.no_sync() if local and self.ddp is not None else nullcontext()

    def _clear_grads(self) -> None:
        """``optimizer.zero_grad(set_to_none=True)`` without its per-call wrappers (dynamo guard,
        profiler record), a fixed cost that a small model's step pays at every step."""
        for param in self.params:
            param.grad = None

    def _drop_unweighted_grads(self, trained: list[tuple[float, dict[str, Any]]]) -> None:
        """Under DDP a term of weight 0 in every batch of the step (not switched on yet, or cut to 0 by its
        fallback) has its parameters get zero gradients (:meth:`_zero_gradient`), which AdamW would decay
        and count as steps; in one process they get none (not computed, or left out of the sum). Leave them
        none here too, so both runs take the same steps; when no term is weighted in any batch, neither does the
        model get one. ``trained``: each batch's (loss, record), a record holding the active terms' (value,
        weight, parts)."""
        if self.state.dist.enabled:
            weighted = {name for _, record in trained for name, (_, weight, _) in record.items() if weight != 0.0}
            if not weighted:  # fallbacks cut every term to 0: one process backpropagates nothing
                self._clear_grads()
                return
            for name, term in self.terms.items():
                if name not in weighted:
                    for param in term.parameters():
                        param.grad = None

    def _lbfgs_step(self, batch: dict[str, Any], weights: dict[str, float], active: set[str],
                    record: dict[str, Any]) -> float:
        """One L-BFGS step; returns the batch's loss, its first evaluation. Only that one is
        recorded and counts fallbacks: the line search re-evaluates the same batch.

        A non-finite first loss gets no gradient, so L-BFGS, whose first test is "gradient
        ~ 0", returns before it moves a parameter; the guard then skips the batch.
        """
        first = True

        def closure() -> torch.Tensor:
            nonlocal first
            self._clear_grads()
            total, value, _ = self._total(batch, weights, active, record if first else None)
            if total.requires_grad and (math.isfinite(value) or not first):
                total.backward()
            first = False
            return total

        # torch types step(closure) for a closure returning a float; L-BFGS returns the closure's first loss tensor
        return self.optimizer.step(closure).item()  # type: ignore[arg-type, attr-defined]

    def _total(self, batch: dict[str, Any], weights: dict[str, float], active: set[str],
               record: dict[str, Any] | None, summed: bool = False) -> tuple[torch.Tensor, float, int]:
        """Σ w_i L_i for this batch (to backpropagate) and its value, the global batch's under
        DDP. Fills ``record`` with each active term's value, weight and parts; ``None``: a
        re-evaluation of the batch, neither recorded nor counted. ``summed`` (accumulating batches):
        the tensor is the loss summed over the global batch's examples, whose count comes third (else 0)."""
        losses = {name: split_term(raw) for name, raw in self._term_values(batch, active).items()}
        scalars, scale, examples = self._term_scalars(batch, losses, summed)
        total: Any = 0.0  # a float until a term joins, so a first term of weight 1 is taken as it is: no 0 + 1·L ops
        global_value = 0.0  # Σ w_i L_i of the global batch, under DDP
        unweighted = False  # a term of weight 0 in this batch
        for name, (loss, _) in losses.items():
            scalar, parts = scalars[name]
            weight = 0.0  # a term not switched on, computed under DDP only (see _wrap_distributed)
            if name in active:
                weight = self.weights.effective(name, weights[name], scalar, count=record is not None)
                if record is not None:
                    record[name] = (scalar, weight, parts)
            if weight == 0.0:  # left out, as in one process: see _zero_gradient
                unweighted = True
                continue
            global_value += weight * scalar
            total = loss if (weight == 1.0 and isinstance(total, float)) else total + weight * loss
        if unweighted and self.state.dist.enabled:
            total = total + self._zero_gradient()
        if isinstance(total, float):  # every term had weight 0: nothing to learn from this batch
            total = torch.zeros((), device=self.state.device)
        if not self.state.dist.enabled:  # one process: the loss reported is the tensor's own value
            value = total.item()
            return (total * examples if summed else total), value, examples
        if summed:  # Σ over the rank's examples, times world_size: DDP's average over ranks makes it the global Σ
            return total * (batch_size(batch) * self.state.dist.world_size), global_value, examples
        return (total if scale == 1.0 else total * scale), global_value, examples

    def _zero_gradient(self) -> torch.Tensor:
        """0 · Σ parameters: under DDP, what the terms of weight 0 in a batch (not switched on, or cut by their
        fallback) add to the loss. It gives every trained parameter the zero gradient DDP's reducer waits for, and
        the batch trains as in one process, which leaves those terms out. Not 0 · L: a NaN or infinite value of
        such a term (one that needs what a later stage builds, one its fallback cut) would skip the batch, and a
        NaN or infinite gradient (0 · inf) would reach every weight."""
        zero = torch.zeros((), device=self.state.device)
        return 0.0 * sum((p.sum() for p in self.objective.parameters() if p.requires_grad), zero)

    def _term_values(self, batch: dict[str, Any], active: set[str]) -> dict[str, Any]:
        """Each term's raw value on ``batch``: the Objective's, or under DDP its wrapper's, which computes
        every term (``active`` None; see :meth:`_wrap_distributed`). Under ``run.precision`` (the forward
        pass and the terms; backward follows autocast's casts, gradients land in float32 parameters)."""
        forward_fn = self.stage.forward_fn(self.objective)
        with autocast(self.state):
            if self.ddp is None:
                return self.objective(batch, forward_fn, active)
            return self.ddp(batch, forward_fn, None)

    def _term_scalars(self, batch: dict[str, Any], values: dict[str, Any],
                      summed: bool) -> tuple[dict[str, Any], float, int]:
        """Each computed term's value and parts as Python floats (float64 running sums, no tensor
        ops), the global batch's under DDP; the factor on the local loss (1 in one process); and the
        global batch's examples where known (under DDP) or ``summed`` asks for them, else 0.
        Under DDP inactive terms are computed too (see :meth:`_wrap_distributed`)."""
        scalars = {name: (value.item(), {k: v.item() for k, v in parts.items()})
                   for name, (value, parts) in values.items()}
        if self.state.dist.enabled:
            return self._global_means(batch, scalars)
        return scalars, 1.0, batch_size(batch) if summed else 0

    def _global_means(self, batch: dict[str, Any], scalars: dict[str, Any]) -> tuple[dict[str, Any], float, int]:
        """Under DDP: each term's and part's mean over the global batch (ranks weighted by their
        share of it), so that fallbacks, the guard and the records see what one process would;
        the factor on the local loss that makes DDP's equal-weight gradient average the
        global batch's gradient even when a last batch splits unevenly; and the global batch's examples."""
        n, dist = batch_size(batch), self.state.dist
        # the parts' names in order, as one number: every rank must send its parts in the same layout
        layout = float(zlib.crc32(repr([(name, list(parts)) for name, (_, parts) in scalars.items()]).encode()))
        # the count carries this process's vote to stop, which every process reads back from the sum
        reduced = iter(all_reduce_sums([n + vote(), layout, *(value * n for value, _ in scalars.values())], dist))
        votes, n_global = votes_and_count(next(reduced))
        self.stop_votes += votes
        if next(reduced) != layout * dist.world_size:  # a rank with other parts would send a longer list: a hang
            raise self._parts_error(scalars)
        flat = [v * n for _, parts in scalars.values() for v in parts.values()]
        summed = iter(all_reduce_sums(flat, dist) if flat else [])
        means = {name: (next(reduced) / n_global, {k: next(summed) / n_global for k in parts})
                 for name, (_, parts) in scalars.items()}
        return means, n * dist.world_size / n_global, round(n_global)

    def _parts_error(self, scalars: dict[str, Any]) -> PluginError:
        """The error when this rank's terms returned other parts (names or order) than another rank's."""
        mine = "; ".join(f"{name!r} ({self.terms[name].name}): {', '.join(parts) or 'none'}"
                         for name, (_, parts) in scalars.items())
        return PluginError(f"stage {self.stage.label!r} epoch {self.pos.epoch} batch {self.pos.batch}: under torchrun "
                           f"the loss terms returned other parts on process {self.state.dist.rank} ({mine}) than on "
                           f"another process, whose share of the batch held other examples; the processes sum each "
                           f"part over the global batch, so a term must return the same parts, in the same order, "
                           f"for every batch: return each part every time (e.g. a zero tensor where a batch has none)")

    def _after_update(self, value: float, lr: float, trained: list[tuple[float, dict[str, Any]]]) -> None:
        """What follows a step the guard let through: the scheduler, the step count, the EMA
        target, the epoch's sums (each of the step's batches, as without accumulation) and the step record."""
        state, o = self.state, self.o
        if o.schedule != "plateau":
            self.scheduler.step()
        state.step += 1
        if state.target_model is not None:
            self._update_target(state.target_model)
        for batch_value, record in trained:
            self._add_to_sums(batch_value, record)
        if state.step % state.recipe.run.log_every_n_steps == 0:
            state.log("step", **{"train/loss": value, "train/lr": lr})

    def _update_target(self, target: torch.nn.Module) -> None:
        """Move the EMA ``target`` towards the model, at the momentum of the stage's step."""
        state, o = self.state, self.o
        end = o.ema_momentum_end if o.ema_momentum_end is not None else o.ema_momentum
        momentum = ema.momentum_at(state.step, self.total_steps, o.ema_momentum, end)
        ema.ema_update(target, state.model, momentum)

    def _add_to_sums(self, value: float, record: dict[str, Any]) -> None:
        """Add a batch's loss and each recorded term's value, weight, weighted value and parts to the
        epoch's running sums, which :meth:`_train_metrics` averages."""
        sums = self.pos.sums
        sums["n"] = sums.get("n", 0) + 1
        sums["loss"] = sums.get("loss", 0.0) + value
        for name, (term, weight, parts) in record.items():
            sums[name] = sums.get(name, 0.0) + term
            sums[f"{name}/weight"] = sums.get(f"{name}/weight", 0.0) + weight
            sums[f"{name}/weighted"] = sums.get(f"{name}/weighted", 0.0) + weight * term  # its share of the loss
            for part, v in parts.items():
                sums[f"{name}/{part}"] = sums.get(f"{name}/{part}", 0.0) + v

    # --- epoch end: evaluation, early stopping, checkpoint ----------------------------------

    def _end_epoch(self, seconds: float) -> None:
        state, pos, o = self.state, self.pos, self.o
        metrics = self._train_metrics()
        metrics.update(self.stage.evaluate(state, self.objective))
        metrics["train/lr"] = self.optimizer.param_groups[0]["lr"]
        self._early_stopping(metrics)
        if o.schedule == "plateau":
            self.scheduler.step(self._monitored(metrics))
        warnings = state.warnings.flush()
        metrics.update({f"warnings/{k}": v for k, v in warnings.items()})
        state.log("epoch", **metrics, seconds=seconds)
        state.print(self._epoch_line(metrics, seconds))
        pos.last_metrics = metrics
        state.fire(Event.AFTER_EPOCH, metrics=metrics)  # before the checkpoint: what hooks log is kept
        pos.epoch += 1
        pos.batch = 0
        pos.sums = {}
        if pos.epoch < o.max_epochs and not pos.stopped_early:  # else the stage's checkpoint follows
            self.save()
            stop_point(state.dist, f"after step {state.step} of stage {state.stage_name!r}, the end of epoch "
                                   f"{pos.epoch}")

    def _train_metrics(self) -> dict[str, Any]:
        # under DDP every rank holds the same sums: each step added the global batch's values
        sums = {k: float(v) for k, v in sorted(self.pos.sums.items())}
        n = sums.pop("n", 0.0)
        metrics = {f"train/{k}": v / n for k, v in sums.items()} if n else {}
        metrics["train/nonfinite"] = self.guard.skipped
        metrics.update({f"train/{name}/fallbacks": c for name, c in self.weights.fallbacks.items()
                        if self.weights.specs[name].fallback_threshold is not None})
        return metrics

    def _monitored(self, metrics: dict[str, Any]) -> float:
        if self.o.monitor not in metrics:
            known = ", ".join(sorted(k for k in metrics if isinstance(metrics[k], float)))
            raise self.state.recipe.error([f"{self.where}.monitor: {self.o.monitor!r} is not a metric of this "
                                           f"stage; metrics: {known}"])
        return float(metrics[self.o.monitor])

    def _early_stopping(self, metrics: dict[str, Any]) -> None:
        pos, o = self.pos, self.o
        if not self.stage.has_eval():
            return
        value = self._monitored(metrics)
        better = pos.best is None or (value < pos.best if o.mode == "min" else value > pos.best)
        if better:
            pos.best, pos.best_epoch, pos.bad_epochs = value, pos.epoch, 0
            pos.best_metrics = metrics
            if o.restore_best:
                self.best_state = self._model_state()
        else:
            pos.bad_epochs += 1
            pos.stopped_early = o.patience is not None and pos.bad_epochs >= o.patience

    def _epoch_line(self, metrics: dict[str, Any], seconds: float) -> str:
        shown = [k for k in ("train/loss", "val/loss", "val/ppl", "val/acc") if k in metrics]
        parts = "  ".join(f"{k} {metrics[k]:.4f}" for k in shown)
        flag = "  *" if self.pos.best_epoch == self.pos.epoch else ""
        return (f"[{self.stage.label}] epoch {self.pos.epoch + 1}/{self.o.max_epochs}  {parts}"
                f"  ({seconds:.1f}s){flag}")

    def _checked(self, value: float, record: dict[str, Any]) -> bool:
        """The guard's verdict on the batch's loss; where the loop is is spelled out (a string
        per term) only for a loss the guard reports, off the per-step path."""
        if math.isfinite(value):
            return self.guard.check(value, "")
        where = self._where(record)
        broken = self._nonfinite_parameters()
        if broken:  # skipping batches leaves them so: every later loss is non-finite, and so is what follows the stage
            shown = ", ".join(broken[:3]) + (f" and {len(broken) - 3} more" if len(broken) > 3 else "")
            raise TrainingError(f"non-finite loss ({value}) at {where}: the weights are no longer finite ({shown}), "
                                f"as a step before this batch diverged, so no later batch can train them. Lower the "
                                f"learning rate or set grad_clip.")
        return self.guard.check(value, where)

    def _nonfinite_parameters(self) -> list[str]:
        """The model's and the terms' parameters holding a NaN or an infinity, named as in the checkpoint."""
        named = [(f"model.{n}", p) for n, p in self.state.model.named_parameters()]
        named += [(f"terms.{n}", p) for n, p in self.objective.terms.named_parameters()]
        return [name for name, p in named if not bool(torch.isfinite(p).all())]

    def _where(self, record: dict[str, Any]) -> str:
        """Where the loop is, naming the terms of ``record`` that are not finite (what a NaN came from)."""
        bad = [f"{name!r} = {value}" for name, (value, _, _) in record.items() if not math.isfinite(value)]
        terms = f", from term{'s' if len(bad) > 1 else ''} {', '.join(bad)}" if bad else ""
        return f"stage {self.stage.label!r} epoch {self.pos.epoch} batch {self.pos.batch}{terms}"

    # --- state for checkpoints --------------------------------------------------------------

    def _model_tensors(self) -> dict[str, torch.Tensor]:
        """The model's and the terms' state dicts in one, keys prefixed ``model.`` / ``terms.``: the
        live tensors, which the next step changes (:meth:`_model_state` keeps a copy)."""
        both = {f"model.{k}": v for k, v in self.state.model.state_dict().items()}
        both.update({f"terms.{k}": v for k, v in self.objective.terms.state_dict().items()})
        return both

    def _model_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self._model_tensors().items()}

    def _load_model_state(self, saved: dict[str, torch.Tensor]) -> None:
        for prefix, module in (("model.", self.state.model), ("terms.", self.objective.terms)):
            module.load_state_dict({k.removeprefix(prefix): v for k, v in saved.items() if k.startswith(prefix)})

    def save(self) -> None:
        """Checkpoint the stage mid-way (``last.pt``), so a killed run resumes from here."""
        pos = asdict(self.pos)
        pos["sums"] = {k: float(v) for k, v in self.pos.sums.items()}
        extra = {
            "loop": pos,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "terms": self.objective.terms.state_dict(),
            "best_state": self.best_state,
            "target": self.state.target_model.state_dict() if self.state.target_model is not None else None,
            "guard": {"skipped": self.guard.skipped, "in_a_row": self.guard.in_a_row},
            "fallbacks": dict(self.weights.fallbacks),
            "warnings": dict(self.state.warnings.counts),  # this epoch's so far, flushed at its end
            "step": self.state.step,
            "epoch_seconds": time.perf_counter() - self.epoch_started,
        }
        self.state.save_checkpoint(done=False, extra=extra)

    def _restore(self, saved: dict[str, Any]) -> None:
        from stagewise.engine.resume import refuse_damaged  # resume reads Position from here

        run_dir = self.state.resumed_from
        if run_dir is None:  # the runner sets both; a State made elsewhere must too
            raise ValueError("TrainLoop: state.resume is set but not state.resumed_from, the run directory it is from")
        refuse_damaged(self._resume_problems(saved), run_dir, self.state.recipe)
        self.pos = Position(**saved["loop"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.objective.terms.load_state_dict(saved["terms"])
        self.best_state = saved["best_state"]
        if saved["target"] is not None and self.state.target_model is not None:
            self.state.target_model.load_state_dict(saved["target"])
        self.guard.skipped, self.guard.in_a_row = saved["guard"]["skipped"], saved["guard"]["in_a_row"]
        self.weights.fallbacks.update(saved["fallbacks"])
        self.state.warnings.counts = Counter(saved.get("warnings", {}))  # older checkpoints lack them
        self.state.step = saved["step"]
        self.epoch_started = time.perf_counter() - saved.get("epoch_seconds", 0.0)  # older checkpoints lack it
        self.rng_to_set = saved["rng"]

    def _resume_problems(self, saved: dict[str, Any]) -> list[str]:
        """Each value :meth:`_restore` would put back that is not what :meth:`save` writes, checked against
        what this stage built (the run checked the model, RNG states, the loop's types and step before)."""
        missing = [key for key in ("loop", *_SAVED) if key not in saved]
        if missing:
            return [f"{', '.join(missing)}: missing from a training stage's checkpoint"]
        pos, target = saved["loop"], self.state.target_model
        problems = [f"loop.{key}: {pos[key]}, expected 0..{end}" for key, end in
                    (("epoch", self.o.max_epochs), ("batch", self.epoch_batches - 1)) if not 0 <= pos[key] <= end]
        if pos["batch"] % self.o.accumulate_batches:  # saved between optimizer steps only
            problems.append(f"loop.batch: {pos['batch']}, expected a multiple of accumulate_batches = "
                            f"{self.o.accumulate_batches}")
        fresh = self.scheduler.state_dict()
        unlike = optimizer_problems(saved["optimizer"], self.optimizer)
        unlike += same_types(saved["scheduler"], fresh, "scheduler")
        # the schedule's values are compared only once the optimizer's and scheduler's state are of the right kinds
        problems += unlike or schedule_problems(saved["optimizer"], saved["scheduler"], fresh)
        problems += tensors_problems(saved["terms"], self.objective.terms.state_dict(), "terms")
        if saved["best_state"] is not None:
            problems += tensors_problems(saved["best_state"], self._model_tensors(), "best_state")  # no copy
        if (saved["target"] is None) != (target is None):
            problems.append(f"target: {'none' if saved['target'] is None else 'an EMA model'}, but this stage "
                            f"{'keeps one' if target is not None else 'keeps none'} (ema_momentum)")
        elif target is not None:
            problems += tensors_problems(saved["target"], target.state_dict(), "target")
        problems += same_types(saved["guard"], {"skipped": 0, "in_a_row": 0}, "guard")
        problems += same_types(saved["fallbacks"], dict(self.weights.fallbacks), "fallbacks")
        problems += counts_problems(saved.get("warnings", {}), "warnings")
        return problems + number_problems(saved.get("epoch_seconds", 0.0), "epoch_seconds")

    def _resume_rng(self) -> None:
        """Set a resumed stage's saved RNG state at the point the uninterrupted run was at when
        it saved: after term setup and the batch iterator, whose draws would shift it."""
        if self.rng_to_set is not None:
            set_rng_state(self.rng_to_set)
            self.rng_to_set = None

    def _wrap_distributed(self) -> torch.nn.parallel.DistributedDataParallel | None:
        """Under DDP the Objective's wrapper, which computes every term (``active`` None). DDP, built without
        ``find_unused_parameters``, expects every parameter to get a gradient at every step: :meth:`_zero_gradient`
        gives one to those only terms of weight 0 reach (see :meth:`_drop_unweighted_grads`)."""
        if not self.state.dist.enabled:
            return None
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.state.device.index] if self.state.device.type == "cuda" else None
        return DistributedDataParallel(self.objective, device_ids=device_ids)
