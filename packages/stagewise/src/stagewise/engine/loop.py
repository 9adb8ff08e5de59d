"""The training loop every training stage runs (see the drawing in :mod:`stagewise.events`).

``TrainLoop`` owns the how: optimizer and schedule, loss-term weights and fallback, gradient
clipping, the non-finite guard, the EMA target, evaluation, early stopping with best-weight
restore, progress, logging and checkpoints. The stage (``stagewise.TrainStage`` or a subclass)
declares the what: options, where batches come from and how outputs are computed.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from stagewise.engine import ema
from stagewise.engine.distributed import all_reduce_sums
from stagewise.engine.guards import NonFiniteGuard
from stagewise.engine.objective import Objective, TermWeights, build_terms, split_term
from stagewise.engine.optim import build_optimizer, build_scheduler
from stagewise.engine.params import select_parameters
from stagewise.errors import ConfigError
from stagewise.events import Event
from stagewise.loss import batch_size

if TYPE_CHECKING:
    from stagewise.builtins.train import TrainStage
    from stagewise.engine.state import State


@dataclass
class Position:
    """Where the loop is, and what it has learned so far: all of it goes into checkpoints."""

    epoch: int = 0
    batch: int = 0  # next batch of the epoch
    best: float | None = None
    best_epoch: int = -1
    bad_epochs: int = 0
    stopped_early: bool = False
    sums: dict[str, float] = field(default_factory=dict)  # running train sums of this epoch
    best_metrics: dict[str, Any] = field(default_factory=dict)
    last_metrics: dict[str, Any] = field(default_factory=dict)


class TrainLoop:
    """One training stage's loop over epochs and batches."""

    def __init__(self, stage: TrainStage, state: State):
        self.stage, self.state, self.o = stage, state, stage.options
        where = f"stages.{stage.label}"
        self.terms = build_terms(self.o.losses, state, where)
        state.terms = self.terms  # event hooks reach the terms through the state (e.g. a refresh after each step)
        self.objective = Objective(state.model, self.terms, state)
        selected = select_parameters(state.model, self.o.train, self.o.freeze, where)
        groups = [[p for _, p in selected], *(list(term.parameters()) for term in self.terms.values())]
        # grad_clip bounds the model's gradient norm and each term's own parameters' apart, so that
        # an auxiliary term's modules (e.g. Koopman operators) never shrink the model's step
        self.clip_groups = [group for group in groups if group]
        self.optimizer = build_optimizer([p for group in groups for p in group], self.o)
        self.steps_per_epoch = stage.steps_per_epoch(state)
        self.scheduler = build_scheduler(self.optimizer, self.o, self.steps_per_epoch * self.o.max_epochs)
        self.weights = TermWeights(self.o.losses, state)
        self.guard = NonFiniteGuard(self.o.max_nonfinite, state.warnings)
        self.trainer = self._wrap_distributed()
        if self.o.ema_momentum is not None:
            state.target_model = ema.make_target(state.model)
        self.pos = Position()
        self.best_state: dict[str, torch.Tensor] | None = None
        if state.resume is not None:
            self._restore(state.resume)

    # --- the loop -------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        state, o = self.state, self.o
        while self.pos.epoch < o.max_epochs and not self.pos.stopped_early:
            state.epoch = self.pos.epoch
            if self.pos.batch == 0:
                state.fire(Event.BEFORE_EPOCH)
            started = time.perf_counter()
            self._train_epoch()
            self._end_epoch(time.perf_counter() - started)
        if o.restore_best and self.best_state is not None:
            self._load_model_state(self.best_state)
        state.epochs_run = self.pos.epoch
        final = self.pos.best_metrics if (o.restore_best and self.pos.best_metrics) else self.pos.last_metrics
        return {**final, "train/best_epoch": self.pos.best_epoch, "train/stopped_early": self.pos.stopped_early}

    def _train_epoch(self) -> None:
        state, pos = self.state, self.pos
        weights = self.weights.for_epoch(pos.epoch)
        active = {n for n, w in weights.items() if w != 0.0}
        batches = self.stage.train_batches(state, pos.epoch, pos.batch)
        total = min(self.steps_per_epoch, self.o.max_steps_per_epoch or self.steps_per_epoch)
        bar = tqdm(batches, total=total, initial=pos.batch, leave=False, disable=not self._show_bar(),
                   desc=f"{self.stage.label} {pos.epoch + 1}/{self.o.max_epochs}")
        for batch in bar:
            if pos.batch >= total:
                break
            loss = self._step(batch, weights, active)
            pos.batch += 1
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            every = state.recipe.run.checkpoint_every_n_steps
            if every and state.step % every == 0 and pos.batch < total:
                self.save()
        bar.close()

    def _step(self, batch: dict[str, Any], weights: dict[str, float], active: set[str]) -> float:
        state, o = self.state, self.o
        state.fire(Event.BEFORE_STEP, batch=batch)
        record: dict[str, Any] = {}

        def closure() -> torch.Tensor:
            self.optimizer.zero_grad(set_to_none=True)
            total = self._total(batch, weights, active, record)
            if total.requires_grad:
                total.backward()
            return total

        if o.optimizer == "lbfgs":
            value = self.optimizer.step(closure).detach().item()
            ok = self.guard.check(value, self._where())
        else:
            self.optimizer.zero_grad(set_to_none=True)
            total = self._total(batch, weights, active, record)
            value = total.item()
            if state.dist.enabled:
                total, value = self._global_batch(batch, total, value)
            ok = self.guard.check(value, self._where())
            if ok:
                total.backward()
                if o.grad_clip is not None:
                    for group in self.clip_groups:
                        torch.nn.utils.clip_grad_norm_(group, o.grad_clip)
                self.optimizer.step()
        if ok:
            self._after_update(value, record)
        state.fire(Event.AFTER_STEP, loss=value)
        return value

    def _global_batch(self, batch: dict[str, Any], total: torch.Tensor, value: float) -> tuple[torch.Tensor, float]:
        """Under DDP: the global batch's loss (every rank then agrees on skipping a non-finite
        one), and the local loss scaled by this rank's share, since DDP averages gradients
        over ranks with equal weight even when a last batch splits unevenly."""
        n = batch_size(batch)
        n_global, weighted = all_reduce_sums([float(n), value * n], self.state.dist)
        scale = n * self.state.dist.world_size / n_global
        return (total if scale == 1.0 else total * scale), weighted / n_global

    def _total(self, batch: dict[str, Any], weights: dict[str, float], active: set[str],
               record: dict[str, Any]) -> torch.Tensor:
        """Σ w_i L_i for this batch; fills ``record`` with each term's detached value and weight."""
        values = self.trainer(batch, self.stage.forward_fn(self.objective), active)
        total: Any = 0.0
        for name, raw in values.items():
            value, parts = split_term(raw)
            weight = weights[name]
            scalar = value.item()  # Python floats (float64) for the running sums: no tensor ops here
            weight = self.weights.effective(name, weight, scalar)
            record[name] = (scalar, weight, {k: v.item() for k, v in parts.items()})
            if weight != 0.0 or self.state.dist.enabled:  # DDP wants every term in the graph
                total = value if (weight == 1.0 and isinstance(total, float)) else total + weight * value
        if isinstance(total, float):  # every term had weight 0: nothing to learn from this batch
            total = torch.zeros((), device=self.state.device)
        return total

    def _after_update(self, value: float, record: dict[str, Any]) -> None:
        state, pos, o = self.state, self.pos, self.o
        if o.schedule != "plateau":
            self.scheduler.step()
        state.step += 1
        if state.target_model is not None:
            total_steps = self.steps_per_epoch * o.max_epochs
            end = o.ema_momentum_end if o.ema_momentum_end is not None else o.ema_momentum
            momentum = ema.momentum_at(state.step, total_steps, o.ema_momentum, end)
            ema.ema_update(state.target_model, state.model, momentum)
        sums = pos.sums
        sums["n"] = sums.get("n", 0) + 1
        sums["loss"] = sums.get("loss", 0.0) + value
        for name, (term, weight, parts) in record.items():
            sums[name] = sums.get(name, 0.0) + term
            sums[f"{name}/weight"] = sums.get(f"{name}/weight", 0.0) + weight
            sums[f"{name}/weighted"] = sums.get(f"{name}/weighted", 0.0) + weight * term  # its share of the loss
            for part, v in parts.items():
                sums[f"{name}/{part}"] = sums.get(f"{name}/{part}", 0.0) + v
        if state.step % state.recipe.run.log_every_n_steps == 0:
            state.log("step", **{"train/loss": value, "train/lr": self.optimizer.param_groups[0]["lr"]})

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

    def _train_metrics(self) -> dict[str, Any]:
        sums = {k: float(v) for k, v in self.pos.sums.items()}
        keys = sorted(sums)
        reduced = dict(zip(keys, all_reduce_sums([sums[k] for k in keys], self.state.dist), strict=True))
        n = reduced.pop("n", 0.0)
        metrics = {f"train/{k}": v / n for k, v in reduced.items()} if n else {}
        metrics["train/nonfinite"] = self.guard.skipped
        metrics.update({f"train/{name}/fallbacks": c for name, c in self.weights.fallbacks.items()
                        if self.weights.specs[name].fallback_threshold is not None})
        return metrics

    def _monitored(self, metrics: dict[str, Any]) -> float:
        if self.o.monitor not in metrics:
            known = ", ".join(sorted(k for k in metrics if isinstance(metrics[k], float)))
            raise ConfigError([f"stages.{self.stage.label}.monitor: {self.o.monitor!r} is not a metric of "
                               f"this stage; metrics: {known}"])
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

    def _show_bar(self) -> bool:
        return not self.state.quiet and self.state.is_main and sys.stderr.isatty()

    def _where(self) -> str:
        return f"stage {self.stage.label!r} epoch {self.pos.epoch} batch {self.pos.batch}"

    # --- state for checkpoints --------------------------------------------------------------

    def _model_state(self) -> dict[str, torch.Tensor]:
        both = {f"model.{k}": v for k, v in self.state.model.state_dict().items()}
        both.update({f"terms.{k}": v for k, v in self.objective.terms.state_dict().items()})
        return {k: v.detach().clone() for k, v in both.items()}

    def _load_model_state(self, saved: dict[str, torch.Tensor]) -> None:
        self.state.model.load_state_dict({k[6:]: v for k, v in saved.items() if k.startswith("model.")})
        self.objective.terms.load_state_dict({k[6:]: v for k, v in saved.items() if k.startswith("terms.")})

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
            "step": self.state.step,
        }
        self.state.save_checkpoint(done=False, extra=extra)

    def _restore(self, saved: dict[str, Any]) -> None:
        self.pos = Position(**saved["loop"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.objective.terms.load_state_dict(saved["terms"])
        self.best_state = saved["best_state"]
        if saved["target"] is not None and self.state.target_model is not None:
            self.state.target_model.load_state_dict(saved["target"])
        self.guard.skipped, self.guard.in_a_row = saved["guard"]["skipped"], saved["guard"]["in_a_row"]
        self.weights.fallbacks.update(saved["fallbacks"])
        self.state.step = saved["step"]

    def _wrap_distributed(self) -> Any:
        """The callable that computes term values: the Objective, or its DDP wrapper."""
        objective = self.objective
        if not self.state.dist.enabled:
            return lambda batch, fn, active: objective(batch, fn, active)
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.state.device.index] if self.state.device.type == "cuda" else None
        wrapped = DistributedDataParallel(objective, device_ids=device_ids)
        return lambda batch, fn, active: wrapped(batch, fn, None)
