"""Gradient accumulation (``accumulate_batches = k``): k batches of B examples make one optimizer step on
the mean loss of their examples, as one batch of k·B would; steps, schedules, hooks, the guard and
checkpoints count optimizer steps. (Under torchrun: test_distributed.py.)"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import read_records, read_summary

import stagewise
from stagewise.engine.checkpoint import load_checkpoint
from stagewise.engine.runner import run_recipe
from stagewise.errors import CheckpointError, ConfigError
from stagewise.plugins import register_plugin, unregister_plugin
from stagewise.recipe import load_recipe
from stagewise.testing import damaged_copy, resume_run, run_killed, run_stopped, run_uninterrupted, timeless_records

# A regression on N rows in file order (shuffle = false, one split): two runs that group the same
# examples into the same optimizer steps take the same steps, whatever their batches.
REGRESSION = """
[run]
name = "accumulate"
seed = 3
device = "cpu"
threads = 1
log_every_n_steps = 1

[data]
use = "stagewise.csv"
path = "r.csv"
target = ["y"]
splits = { train = 1.0 }
shuffle = false

[model]
use = "stagewise.mlp"
hidden = [8]

[[stages]]
name = "fit"
losses = [{ use = "stagewise.mse" }]
optimizer = "sgd"
lr = 0.1
weight_decay = 0.0
max_epochs = 2
eval_split = ""
"""


def _regression(tmp_path, name, n, batch_size, k):
    """Run the regression on ``n`` rows with ``batch_size`` and ``accumulate_batches = k``; returns
    (final parameters, [(step, train/loss)] of the step records)."""
    folder = tmp_path / name
    folder.mkdir()
    rows = "".join(f"{i / n:.4f},{(i * 7) % 5 / 5:.4f},{2 * i / n - (i * 7) % 5 / 5 + 0.1 * (i % 3):.4f}\n"
                   for i in range(n))
    (folder / "r.csv").write_text("a,b,y\n" + rows)
    (folder / "r.toml").write_text(REGRESSION)
    recipe = load_recipe(folder / "r.toml", [f"data.batch_size={batch_size}", f"stages.fit.accumulate_batches={k}"])
    run_dir = run_recipe(recipe, out=folder / "run", quiet=True)
    steps = [(r["step"], r["train/loss"]) for r in read_records(run_dir, "step")]
    return stagewise.load_model(run_dir).state_dict(), steps


@pytest.mark.parametrize(("n", "batch_size", "k", "steps_per_epoch"), [
    (48, 4, 2, 6),  # whole steps: 6 of 2 batches of 4, as 6 batches of 8
    (18, 5, 2, 2),  # batches 5 5 | 5 3: each weighted by its examples, as batches 10 | 8
    (18, 5, 3, 2),  # batches 5 5 5 | 3: the epoch's leftover batch makes a step of its own, as 15 | 3
])
def test_k_batches_of_b_take_the_steps_of_one_batch_of_k_times_b(tmp_path, n, batch_size, k, steps_per_epoch):
    accumulated, accumulated_steps = _regression(tmp_path, "accumulated", n, batch_size, k)
    whole, whole_steps = _regression(tmp_path, "whole", n, batch_size * k, 1)
    assert [s for s, _ in accumulated_steps] == [s for s, _ in whole_steps] == list(range(1, 2 * steps_per_epoch + 1))
    assert [loss for _, loss in accumulated_steps] == pytest.approx([loss for _, loss in whole_steps], rel=1e-5)
    assert whole_steps[-1][1] < whole_steps[0][1]  # the runs trained
    for key, value in whole.items():
        torch.testing.assert_close(accumulated[key], value, rtol=1e-5, atol=1e-6, msg=key)


class StepCounter:
    """phase1's step hooks, its epochs' progress bars and the batches its epochs draw."""

    def __init__(self):
        self.before: list[tuple[int, int]] = []  # (state.step, the batch's examples)
        self.after: list[int] = []  # state.step

    @stagewise.hookimpl
    def stagewise_before_step(self, state, batch):
        if state.stage_name == "phase1":
            self.before.append((state.step, batch["input"].shape[0]))

    @stagewise.hookimpl
    def stagewise_after_step(self, state):
        if state.stage_name == "phase1":
            self.after.append(state.step)


def test_steps_schedules_step_hooks_and_the_progress_bar_count_optimizer_steps(tiny, tmp_path, monkeypatch):
    from stagewise.builtins.train import TrainStage
    from stagewise.engine.state import State

    drawn, bars = [], []
    train_batches, progress = TrainStage.train_batches, State.progress

    def counted(self, state, epoch, start):
        for batch in train_batches(self, state, epoch, start):
            drawn.append((state.stage_name, epoch))
            yield batch

    def bar(self, iterable, *, desc, total=None, initial=0):
        if self.stage_name == "phase1" and desc.startswith("epoch"):
            bars.append(total)
        return progress(self, iterable, desc=desc, total=total, initial=initial)

    monkeypatch.setattr(TrainStage, "train_batches", counted)
    monkeypatch.setattr(State, "progress", bar)
    counter = StepCounter()
    register_plugin(counter, "acctest")
    try:  # 3 optimizer steps of 2 batches an epoch, over 2 epochs: a cosine over 6 steps
        recipe = tiny("stages.phase1.accumulate_batches=2", "stages.phase1.max_steps_per_epoch=3",
                      'stages.phase1.schedule="cosine"', "stages.phase1.ema_momentum=0.5")
        run_dir = run_recipe(recipe, out=tmp_path / "run", quiet=True)
    finally:
        unregister_plugin("acctest")
    assert [drawn.count(("phase1", epoch)) for epoch in (0, 1)] == [6, 6] and bars == [6, 6]
    assert counter.before == [(step, 4) for step in range(6)]  # once a step, with its first batch (batch_size 4)
    assert counter.after == list(range(1, 7))
    steps = [r for r in read_records(run_dir, "step") if r["stage"] == "phase1"]
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert [r["train/lr"] for r in steps] == pytest.approx([1e-2 * 0.5 * (1 + math.cos(math.pi * s / 6))
                                                            for s in range(6)])
    epochs = [r for r in read_records(run_dir, "epoch") if r["stage"] == "phase1"]
    assert [r["train/lr"] for r in epochs] == pytest.approx([5e-3, 0.0], abs=1e-12)  # the cosine's middle, its end
    assert read_summary(run_dir)["stages"]["phase1"]["metrics"]["train/nonfinite"] == 0


class NanAt(stagewise.Loss):
    """Cross-entropy, NaN at phase1's training forward pass number ``NanAt.at`` (counted from 1; every one
    with 0). Snapshots tells it when a step runs, so passes of the evaluation are not counted."""

    name = "acctest.nan_at"
    at = calls = 0
    stepping = False

    def forward(self, outputs, batch, state):
        logits = outputs["logits"]
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch["target"].reshape(-1))
        if NanAt.stepping and state.stage_name == "phase1":
            NanAt.calls += 1
            return loss * float("nan") if NanAt.at in (0, NanAt.calls) else loss
        return loss


class Snapshots:
    """phase1's parameters before and after each step, with the step's loss."""

    def __init__(self):
        self.steps: list[tuple[float, bool]] = []  # (loss, parameters unchanged by the step)
        self.before: list[torch.Tensor] = []

    @stagewise.hookimpl
    def stagewise_register_losses(self, register):
        register(NanAt)

    @stagewise.hookimpl
    def stagewise_before_step(self, state):
        self.before = [p.detach().clone() for p in state.model.parameters()]
        NanAt.stepping = True

    @stagewise.hookimpl
    def stagewise_after_step(self, state, loss):
        NanAt.stepping = False
        if state.stage_name == "phase1":
            same = all(torch.equal(a, p) for a, p in zip(self.before, state.model.parameters(), strict=True))
            self.steps.append((loss, same))


@pytest.mark.parametrize("at", [1, 2])  # the step's first batch, its last (after the first's backward)
def test_a_nonfinite_loss_in_one_batch_skips_the_whole_step_counted_once(tiny, tmp_path, at):
    spy = Snapshots()
    NanAt.at, NanAt.calls = at, 0
    register_plugin(spy, "acctest")
    try:
        recipe = tiny("stages.phase1.accumulate_batches=2", "stages.phase1.max_steps_per_epoch=2",
                      "stages.phase1.max_epochs=1", 'stages.phase1.losses=[{use="acctest.nan_at"}]')
        run_dir = run_recipe(recipe, out=tmp_path / "run", quiet=True)
    finally:
        unregister_plugin("acctest")
    assert [(math.isnan(loss), same) for loss, same in spy.steps] == [(True, True), (False, False)]
    assert NanAt.calls == at + 2  # the skipped step's batches after the NaN are drawn, not computed
    assert [r["step"] for r in read_records(run_dir, "step") if r["stage"] == "phase1"] == [1]
    epoch = next(r for r in read_records(run_dir, "epoch") if r["stage"] == "phase1")
    assert epoch["train/nonfinite"] == 1 and epoch["warnings/nonfinite_loss"] == 1
    assert math.isfinite(epoch["train/loss"])  # the batches of the skipped step are not in it


def test_the_guard_counts_skipped_steps_in_a_row(tiny, tmp_path):
    NanAt.at = NanAt.calls = 0  # every batch non-finite: max_nonfinite = 2 steps, the second from batch 2 on
    register_plugin(Snapshots(), "acctest")
    try:
        recipe = tiny("stages.phase1.accumulate_batches=2", "stages.phase1.max_nonfinite=2",
                      'stages.phase1.losses=[{use="acctest.nan_at"}]')
        with pytest.raises(stagewise.TrainingError, match=r"2 non-finite losses in a row at stage 'phase1' epoch 0 "
                                                          r"batch 2.*max_nonfinite = 2"):
            run_recipe(recipe, out=tmp_path / "run", quiet=True)
    finally:
        unregister_plugin("acctest")


@pytest.mark.parametrize(("overrides", "problem"), [
    (["stages.phase1.accumulate_batches=0"], "stages.phase1.accumulate_batches: must be >= 1, got 0"),
    (['stages.phase1.optimizer="lbfgs"', "stages.phase1.accumulate_batches=2", "~stages.phase1.grad_clip"],
     "stages.phase1.accumulate_batches: cannot be more than 1 with optimizer 'lbfgs'"),
])
def test_bad_accumulate_batches_are_refused_before_the_run(tiny, tmp_path, overrides, problem):
    with pytest.raises(ConfigError) as info:
        run_recipe(tiny(*overrides), out=tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()
    assert any(p.startswith(problem) for p in info.value.problems), info.value.problems


def test_a_run_killed_mid_epoch_resumes_at_a_step_boundary_bit_identically(tiny_recipe_path, tmp_path):
    sets = ["stages.phase1.accumulate_batches=3", "run.checkpoint_every_n_steps=2"]
    run_killed(tiny_recipe_path, tmp_path / "killed", "phase1", 3, sets)  # its last checkpoint: after step 2
    saved = load_checkpoint(tmp_path / "killed" / "checkpoints" / "last.pt")
    assert (saved["step"], saved["loop"]["epoch"], saved["loop"]["batch"]) == (2, 0, 6)  # mid-epoch, 2 steps of 3
    resume_run(tiny_recipe_path, tmp_path / "killed", sets)
    run_uninterrupted(tiny_recipe_path, tmp_path / "whole", sets)
    assert read_summary(tmp_path / "killed")["metrics"] == read_summary(tmp_path / "whole")["metrics"]
    assert timeless_records(tmp_path / "killed") == timeless_records(tmp_path / "whole")


def test_a_resume_refuses_a_checkpoint_taken_inside_a_step(tiny, tmp_path):
    recipe = tiny("stages.phase1.accumulate_batches=3", "run.checkpoint_every_n_steps=1")
    stopped = run_stopped(recipe, tmp_path / "stopped", "phase1", 2)  # last.pt: after step 1, at batch 3
    run = damaged_copy(stopped, tmp_path / "run", lambda saved: saved["loop"].update(batch=4))
    with pytest.raises(CheckpointError, match="loop.batch: 4, expected a multiple of accumulate_batches = 3"):
        run_recipe(recipe, resume=run, quiet=True)


@pytest.mark.parametrize("k", [1, 2])
def test_a_step_whose_every_term_is_cut_to_weight_0_changes_nothing(tiny, tmp_path, k):
    # was: a RuntimeError (backward of a loss with no gradient) once the fallback cut the only term to 0
    recipe = tiny(f"stages.phase1.accumulate_batches={k}", "stages.phase1.max_epochs=1", "~stages.phase2",
                  'stages.phase1.losses=[{use="stagewise.cross_entropy", fallback_threshold=0.0, '
                  'fallback_factor=0.0}]')
    before = run_recipe(tiny("stages.phase1.max_epochs=1", "stages.phase1.lr=0.0", "~stages.phase2"),
                        out=tmp_path / "untrained", quiet=True)
    run_dir = run_recipe(recipe, out=tmp_path / "run", quiet=True)
    epoch = next(r for r in read_records(run_dir, "epoch") if r["stage"] == "phase1")
    assert epoch["train/cross_entropy/weight"] == 0.0 and epoch["train/cross_entropy/fallbacks"] == 5 * k
    assert epoch["step"] == 5 and epoch["train/nonfinite"] == 0
    trained, untrained = stagewise.load_model(run_dir).state_dict(), stagewise.load_model(before).state_dict()
    assert all(torch.equal(trained[key], value) for key, value in untrained.items())
