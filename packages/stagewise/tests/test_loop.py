"""The training loop's bookkeeping: logged learning rates, L-BFGS under the guard and the
fallback count, warnings under --quiet, and the batches an epoch draws."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import read_records, read_summary

import stagewise
from stagewise.engine.runner import run_recipe
from stagewise.plugins import register_plugin, unregister_plugin

FALLBACK = 'losses=[{use="stagewise.cross_entropy", fallback_threshold=1.0}]'  # CE ~ 5: every batch is cut


class NanOnce(stagewise.Loss):
    """Cross-entropy, but NaN on the third training batch of stage phase2."""

    name = "looptest.nan_once"
    batches = 0  # phase2's training batches so far, counted by Snapshots

    def forward(self, outputs, batch, state):
        logits = outputs["logits"]
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch["target"].reshape(-1))
        return loss * float("nan") if self.training and NanOnce.batches == 3 else loss


class Snapshots:
    """The trained parameters before and after each step of phase2, with the step's loss."""

    def __init__(self):
        self.steps: list[tuple[float, bool]] = []  # (loss, parameters unchanged by the step)
        self.before: list[torch.Tensor] = []

    @stagewise.hookimpl
    def stagewise_register_losses(self, register):
        register(NanOnce)

    @stagewise.hookimpl
    def stagewise_before_step(self, state):
        NanOnce.batches += state.stage_name == "phase2"
        self.before = [p.detach().clone() for p in state.model.parameters()]

    @stagewise.hookimpl
    def stagewise_after_step(self, state, loss):
        if state.stage_name == "phase2":
            same = all(torch.equal(a, p) for a, p in zip(self.before, state.model.parameters(), strict=True))
            self.steps.append((loss, same))


def test_step_records_log_the_learning_rate_the_step_used(tiny, tmp_path):
    recipe = tiny('stages.phase1.schedule="warmup"', "stages.phase1.warmup_steps=3")
    run_dir = run_recipe(recipe, out=tmp_path / "run", quiet=True)
    lrs = [r["train/lr"] for r in read_records(run_dir, "step") if r["stage"] == "phase1"]
    assert lrs[:4] == pytest.approx([1e-2 / 3, 2e-2 / 3, 1e-2, 1e-2])  # (step + 1) / warmup_steps


def test_a_nonfinite_loss_leaves_lbfgs_parameters_unchanged(tiny, tmp_path):
    spy = Snapshots()
    NanOnce.batches = 0
    register_plugin(spy, "looptest")
    try:
        recipe = tiny('stages.phase2.optimizer="lbfgs"', "stages.phase2.lbfgs_max_iter=2",
                      'stages.phase2.losses=[{use="looptest.nan_once"}]')
        run_dir = run_recipe(recipe, out=tmp_path / "run", quiet=True)
    finally:
        unregister_plugin("looptest")
    skipped = [same for loss, same in spy.steps if math.isnan(loss)]
    assert skipped == [True]  # the one NaN step moved no parameter
    assert not all(same for loss, same in spy.steps if not math.isnan(loss))  # the others trained
    phase2 = read_summary(run_dir)["stages"]["phase2"]["metrics"]
    assert phase2["train/nonfinite"] == 1 and math.isfinite(phase2["val/loss"])


def test_lbfgs_counts_a_fallback_once_per_batch(tiny, tmp_path):
    recipe = tiny('stages.phase2.optimizer="lbfgs"', "stages.phase2.lbfgs_max_iter=3", f"stages.phase2.{FALLBACK}")
    run_dir = run_recipe(recipe, out=tmp_path / "run", quiet=True)
    epochs = [r for r in read_records(run_dir, "epoch") if r["stage"] == "phase2"]
    assert [r["warnings/fallback/cross_entropy"] for r in epochs] == [5, 5]  # 5 steps an epoch
    assert epochs[-1]["train/cross_entropy/fallbacks"] == 10


def test_quiet_keeps_warnings(tiny, tmp_path, capsys):
    run_recipe(tiny(f"stages.phase1.{FALLBACK}"), out=tmp_path / "run", quiet=True)
    err = capsys.readouterr().err
    assert "stagewise: warning: loss term 'cross_entropy'" in err
    assert "'fallback/cross_entropy' happened 5 times this epoch" in err


def test_an_epoch_draws_only_the_batches_it_trains_on(tiny, tmp_path, monkeypatch):
    from stagewise.builtins.train import TrainStage

    drawn = []
    original = TrainStage.train_batches

    def counted(self, state, epoch, start):
        for batch in original(self, state, epoch, start):
            drawn.append(epoch)
            yield batch

    monkeypatch.setattr(TrainStage, "train_batches", counted)
    run_recipe(tiny(), out=tmp_path / "run", quiet=True)
    assert len(drawn) == 20  # 2 stages x 2 epochs x max_steps_per_epoch 5, of a longer split
