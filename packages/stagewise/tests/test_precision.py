"""[run] precision: bfloat16 autocast for forward passes and loss terms; float32 everywhere else."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import read_summary

from stagewise.builtins.losses import MSE
from stagewise.engine.checkpoint import load_checkpoint
from stagewise.engine.precision import autocast
from stagewise.engine.runner import run_recipe
from stagewise.errors import ConfigError
from stagewise.testing import run_stopped, timeless_records

BF16 = 'run.precision="bf16"'


def _numbers(metrics: dict) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if isinstance(v, float) and not k.endswith(("seconds", "/lr"))}


def test_bf16_runs_are_deterministic_close_to_fp32_and_not_equal(tiny, tmp_path):
    fp32 = read_summary(run_recipe(tiny(), out=tmp_path / "fp32", quiet=True))["metrics"]
    first = run_recipe(tiny(BF16), out=tmp_path / "bf16", quiet=True)
    again = run_recipe(tiny(BF16), out=tmp_path / "again", quiet=True)
    assert timeless_records(first) == timeless_records(again)  # bit-identical on the same CPU
    bf16 = read_summary(first)["metrics"]
    losses = [k for k in _numbers(fp32) if k.endswith("/loss")]
    assert {"train/loss", "val/loss", "test/loss"} <= set(losses)
    for key in losses:
        assert math.isclose(bf16[key], fp32[key], rel_tol=0.02), (key, bf16[key], fp32[key])
        assert bf16[key] != fp32[key], key  # autocast ran: bfloat16 rounds every matmul's inputs


def test_bf16_keeps_weights_and_optimizer_state_in_float32(tiny, tmp_path):
    run_dir = run_recipe(tiny(BF16), out=tmp_path / "bf16", quiet=True)
    final = load_checkpoint(run_dir / "checkpoints" / "test.pt")["model"]
    assert final and {t.dtype for t in final.values() if t.is_floating_point()} == {torch.float32}
    stopped = run_stopped(tiny(BF16, "run.checkpoint_every_n_steps=1"), tmp_path / "stopped", "phase1", step=3)
    mid = load_checkpoint(stopped / "checkpoints" / "last.pt")  # mid-stage: holds AdamW's moments
    moments = [t for s in mid["optimizer"]["state"].values() for t in s.values() if t.is_floating_point() and t.dim()]
    assert moments and {t.dtype for t in moments} == {torch.float32}


def test_the_resolved_recipe_records_the_precision(tiny, tmp_path):
    run_dir = run_recipe(tiny(BF16, "stages.phase1.max_epochs=1", "~stages.phase2"), out=tmp_path / "r", quiet=True)
    assert 'precision = "bf16"' in (run_dir / "recipe.toml").read_text()
    assert tiny().table["run"]["precision"] == "fp32"


def test_a_precision_other_than_fp32_or_bf16_is_refused_naming_the_choices(tiny):
    with pytest.raises(ConfigError) as info:
        tiny('run.precision="fp16"')
    message = str(info.value)
    assert "tiny.toml" in message and "run.precision" in message and "'fp32'" in message and "'bf16'" in message


@pytest.mark.parametrize("precision, enabled, inside", [("fp32", True, False), ("bf16", True, True),
                                                        ("bf16", False, False)])
def test_autocast_follows_the_run_s_precision(precision, enabled, inside):
    state = SimpleNamespace(recipe=SimpleNamespace(run=SimpleNamespace(precision=precision)),
                            device=torch.device("cpu"))
    with autocast(state, enabled=enabled):  # type: ignore[arg-type]  # a State's two fields autocast reads
        assert torch.is_autocast_enabled("cpu") is inside
        product = torch.ones(2, 2) @ torch.ones(2, 2)
    assert product.dtype == (torch.bfloat16 if inside else torch.float32)


def test_mse_under_bf16_keeps_the_targets_and_the_error_in_float32():
    # regression targets near 100, where bfloat16's spacing is 0.5: rounded to it, they would move the loss by far
    # more than the prediction's own rounding (a bf16 run's last layer gives bfloat16 predictions)
    target = torch.linspace(100, 101, 64).view(64, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred = torch.nn.functional.linear(target + 0.25, torch.eye(1))
        loss = MSE()({"output": pred}, {"target": target}, None)
        total, count = MSE().eval_sums({"output": pred}, {"target": target}, None)["loss"]
    assert pred.dtype == torch.bfloat16 and count == 64
    squared = (pred.double() - target.double()) ** 2  # the error of the very predictions made
    assert math.isclose(loss.item(), squared.mean().item(), rel_tol=1e-6), (loss.item(), squared.mean().item())
    assert math.isclose(total, squared.sum().item(), rel_tol=1e-6), (total, squared.sum().item())
