"""run.precision = "bf16" in the ASHEM pipeline: routed evaluation follows it, routing scores stay float32."""

from __future__ import annotations

import math

import torch
from conftest import read_summary
from test_routed import small_model

from stagewise.engine.runner import run_recipe
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
