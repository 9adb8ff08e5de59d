"""run.precision = "bf16" in the ASHEM pipeline: routed evaluation follows it, routing scores stay float32."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, read_summary
from test_routed import small_model
from torch.overrides import TorchFunctionMode

from stagewise.engine.runner import run_recipe
from stagewise.recipe import load_recipe
from stagewise_lego_ashem import timing
from stagewise_lego_ashem.routed import routed_forward
from stagewise_lego_ashem.router import Confidence


def test_routing_under_bf16_autocast_scores_tokens_in_float32():
    model, idx = small_model(), torch.randint(0, 40, (4, 9), generator=torch.Generator().manual_seed(6))
    router = Confidence()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        h = model.exit_hidden(idx)  # what routed_forward routes on: the lower layers at the run's precision
    with torch.no_grad():
        scores = router.score(model, h.float())[0].flatten()  # the float32 confidences calibration reads
    for threshold in scores.sort().values[1:-1:4].tolist():  # thresholds on tokens' own scores: the closest calls
        expected = router.route(scores.view(4, 9), threshold).masks["easy"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = routed_forward(model, idx, router, threshold, keep_exit_logits=True)
        assert torch.equal(out["easy"], expected), threshold
        assert out["exit_logits"].dtype == torch.float32


def test_a_bf16_run_of_the_pipeline_is_close_to_fp32(tiny, tiny_run, tmp_path):
    fp32 = read_summary(tiny_run)["metrics"]
    bf16 = read_summary(run_recipe(tiny('run.precision="bf16"'), out=tmp_path / "bf16", quiet=True))["metrics"]
    for key in ("train/loss", "val/loss", "test/routed_loss", "test/full_depth_ppl"):
        assert math.isclose(bf16[key], fp32[key], rel_tol=0.03), (key, bf16[key], fp32[key])
        assert bf16[key] != fp32[key], key  # autocast ran


class _LinearDtypes(TorchFunctionMode):
    """The dtypes of every linear layer's output inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: set[torch.dtype] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is F.linear:
            self.dtypes.add(out.dtype)
        return out


@pytest.fixture(scope="module")
def timed_bf16(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, list[set[torch.dtype]]]:
    """A bf16 run of the pipeline with both speed measurements, and the dtypes of the linear layers each timed."""
    path = tmp_path_factory.mktemp("timed") / "tiny.toml"
    path.write_text(TINY)
    recipe = load_recipe(path, ['run.precision="bf16"', "stages.phase2.max_epochs=1",
                                "stages.phase2.measure_speed=true", "stages.test.measure_speed=true",
                                "stages.test.curve_points=0"])
    timed_dtypes: list[set[torch.dtype]] = []

    def timed(fns, repeats, rounds=timing.every_round):  # each call once, untimed: only what it computes in
        with _LinearDtypes() as linear:
            for fn in fns.values():
                fn()
        timed_dtypes.append(linear.dtypes)
        return {name: 1.0 for name in fns}

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(timing, "interleaved_seconds", timed)
        run_dir = run_recipe(recipe, out=path.parent / "run", quiet=True)
    return read_summary(run_dir)["metrics"], timed_dtypes


def test_a_bf16_run_routes_the_calibration_split_as_it_was_calibrated(timed_bf16):
    metrics, _ = timed_bf16
    # phase 2 trains the layers above the exit only, so its val/ split, the mine stage's calib_split, still routes
    # the calibrated share of tokens hard: mining and routing ran the layers below the exit at the same precision
    assert math.isclose(metrics["val/shallow_ratio"], 1 - metrics["mine/calib_hard_ratio"], abs_tol=1e-9)


def test_a_bf16_run_times_its_speedups_at_its_own_precision(timed_bf16):
    metrics, timed_dtypes = timed_bf16
    assert "phase2/phase2_cache_speedup" in metrics and "test/speedup_measured" in metrics
    # phase 2's steps, then the routed and full-depth forward passes: their layers in bfloat16, as the run's
    assert timed_dtypes == [{torch.bfloat16}, {torch.bfloat16}]
