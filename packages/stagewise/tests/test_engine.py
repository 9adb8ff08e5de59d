"""The engine end to end on the tiny recipe: determinism, golden numbers, freezing, growth."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import read_records, read_summary

from stagewise.engine.checkpoint import load_checkpoint
from stagewise.engine.runner import run_recipe
from stagewise.verify import compare

GOLDEN = Path(__file__).parent / "golden" / "tiny.json"


def test_same_seed_gives_bit_identical_metrics(tiny, tmp_path):
    a = read_summary(run_recipe(tiny(), out=tmp_path / "a", quiet=True))
    b = read_summary(run_recipe(tiny(), out=tmp_path / "b", quiet=True))
    assert a["metrics"] == b["metrics"]
    assert [r["train/loss"] for r in read_records(tmp_path / "a", "step")] == \
           [r["train/loss"] for r in read_records(tmp_path / "b", "step")]


def test_other_seed_gives_other_numbers(tiny, tmp_path):
    a = read_summary(run_recipe(tiny(), out=tmp_path / "a", quiet=True))
    b = read_summary(run_recipe(tiny("run.seed=8"), out=tmp_path / "b", quiet=True))
    assert a["metrics"]["val/loss"] != b["metrics"]["val/loss"]


def test_golden_record(tiny, tmp_path):
    """The tiny recipe's final metrics, exactly. A change here is a behaviour change: say why."""
    summary = read_summary(run_recipe(tiny(), out=tmp_path / "run", quiet=True))
    golden = json.loads(GOLDEN.read_text())
    assert compare(summary["metrics"], golden["metrics"], golden.get("tolerance", {})) == []


def test_run_directory_layout(tiny, tmp_path):
    run_dir = run_recipe(tiny(), out=tmp_path / "run", quiet=True)
    names = sorted(p.name for p in run_dir.iterdir() if p.name != "plots")  # plots need matplotlib
    assert names == ["checkpoints", "env.json", "metrics.jsonl", "recipe.toml", "summary.json"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == \
        ["last.pt", "phase1.pt", "phase2.pt", "test.pt"]
    summary = read_summary(run_dir)
    assert list(summary) == ["recipe", "seed", "stages", "metrics"]
    assert list(summary["stages"]) == ["phase1", "phase2", "test"]
    assert summary["stages"]["phase1"]["epochs"] == 2
    env = json.loads((run_dir / "env.json").read_text())
    assert env["torch"] == torch.__version__ and env["plugins"]["stagewise"]["distribution"] == "stagewise"
    steps = read_records(run_dir, "step")
    assert len(steps) == 20 and {r["stage"] for r in steps} == {"phase1", "phase2"}


def test_frozen_parameters_never_change(tiny, tmp_path):
    run_dir = run_recipe(tiny(), out=tmp_path / "run", quiet=True)
    before = load_checkpoint(run_dir / "checkpoints" / "phase1.pt")["model"]
    after = load_checkpoint(run_dir / "checkpoints" / "phase2.pt")["model"]
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name  # layers 0-1, embedding, head, norm
    assert "layers.2.attn.wq.weight" in after or any(k.startswith("layers.2.") for k in after)
    assert not any(k.startswith("layers.2.") for k in before)


def test_early_stopping_restores_best_weights(tiny, tmp_path):
    # lr so high that validation loss gets worse after the first epoch
    recipe = tiny("stages.phase1.lr=1.0", "stages.phase1.max_epochs=5", "stages.phase1.patience=1")
    run_dir = run_recipe(recipe, out=tmp_path / "run", quiet=True)
    phase1 = read_summary(run_dir)["stages"]["phase1"]
    epochs = [r for r in read_records(run_dir, "epoch") if r["stage"] == "phase1"]
    assert phase1["metrics"]["train/stopped_early"] is True
    assert phase1["epochs"] == len(epochs) < 5
    best = min(epochs, key=lambda r: r["val/loss"])
    assert phase1["metrics"]["val/loss"] == best["val/loss"]
    assert phase1["metrics"]["train/best_epoch"] == best["epoch"]


def test_nonfinite_losses_abort_with_a_clear_error(tiny, tmp_path):
    from stagewise.errors import TrainingError

    recipe = tiny("stages.phase1.lr=1e30", "stages.phase1.max_nonfinite=2", "stages.phase1.grad_clip=1e30")
    with pytest.raises(TrainingError, match="non-finite losses in a row"):
        run_recipe(recipe, out=tmp_path / "run", quiet=True)


@pytest.mark.parametrize("schedule", ["constant", "warmup", "cosine", "plateau"])
def test_lr_schedules_run(tiny, tmp_path, schedule):
    recipe = tiny(f"stages.phase1.schedule={schedule!r}".replace("'", '"'), "stages.phase1.warmup_steps=3")
    run_dir = run_recipe(recipe, out=tmp_path / "run", quiet=True)
    lrs = [r["train/lr"] for r in read_records(run_dir, "step") if r["stage"] == "phase1"]
    if schedule == "constant":
        assert set(lrs) == {1e-2}
    elif schedule == "warmup":
        assert lrs[:3] == pytest.approx([1 / 3 * 1e-2, 2 / 3 * 1e-2, 1e-2]) and lrs[-1] == pytest.approx(1e-2)
    elif schedule == "cosine":
        assert lrs[2] == pytest.approx(1e-2) and lrs[-1] < lrs[3]
    else:
        assert lrs[0] == 1e-2


@pytest.mark.parametrize("optimizer", ["sgd", "lbfgs"])
def test_other_optimizers(tiny, tmp_path, optimizer):
    # phase2 has no grad_clip, which L-BFGS refuses
    recipe = tiny(f'stages.phase2.optimizer="{optimizer}"', "stages.phase2.lr=0.1", "stages.phase2.lbfgs_max_iter=2")
    metrics = read_summary(run_recipe(recipe, out=tmp_path / "run", quiet=True))["metrics"]
    assert metrics["val/loss"] == metrics["val/loss"]  # finite, not NaN


def test_ema_target_follows_the_model(tiny, tmp_path):
    from stagewise import hookimpl
    from stagewise.plugins import register_plugin, unregister_plugin

    seen = []

    class Watcher:
        @hookimpl
        def stagewise_after_stage(self, state):
            if state.target_model is not None:
                t = dict(state.target_model.named_parameters())["embedding.weight"]
                m = dict(state.model.named_parameters())["embedding.weight"].detach()
                seen.append((t - m).abs().max().item())

    register_plugin(Watcher(), "watcher")
    try:
        recipe = tiny("stages.phase1.ema_momentum=0.9", "stages.phase1.ema_momentum_end=1.0")
        run_recipe(recipe, out=tmp_path / "run", quiet=True)
    finally:
        unregister_plugin("watcher")
    assert len(seen) == 1 and seen[0] > 0  # the target lags the trained model


def test_artifacts_are_checkpointed(tiny, tmp_path):
    run_dir = run_recipe(tiny(), out=tmp_path / "run", quiet=True)
    saved = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert saved["stage_name"] == "test" and saved["stage_done"] is True
    assert saved["model_options"]["n_layer"] == 3


def test_existing_run_directory_is_not_overwritten(tiny, tmp_path):
    from stagewise.errors import CheckpointError

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="--resume"):
        run_recipe(tiny(), out=tmp_path / "run", quiet=True)
    assert (tmp_path / "run" / "keep.txt").read_text() == "mine"
