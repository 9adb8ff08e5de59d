"""run.precision = "bf16" with a Koopman term: the model runs under autocast, the term in float32."""

from __future__ import annotations

import json
import math

import torch
from conftest import run_tiny, tiny_recipe
from stagewise_koopman.loss import KoopmanOperator


def test_the_koopman_term_computes_in_float32_under_bf16_autocast():
    term = KoopmanOperator(KoopmanOperator.Options(koopman_dim=4, steps=2)).build(4, 8)
    torch.manual_seed(0)
    hidden = [torch.randn(2, 5, 8) for _ in range(4)]
    expected, _ = term.errors(hidden)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        errors, lifted = term.errors([h.bfloat16() for h in hidden])
    assert lifted.dtype == torch.float32 and {e.dtype for e in errors.values()} == {torch.float32}
    for part, value in errors.items():  # only the inputs' rounding to bfloat16 moves them
        assert math.isclose(value.item(), expected[part].item(), rel_tol=0.05), part


def test_a_bf16_hybrid_run_with_dmd_refreshes_finishes_close_to_fp32(tiny_run, tmp_path):
    # dmd_every: the term's lifted states go into float32 buffers (a bfloat16 source was refused there)
    assert tiny_recipe().stages[1].options.losses[1].options.dmd_every
    bf16 = run_tiny(tmp_path / "bf16", overrides=['run.precision="bf16"'])
    fp32, ours = (json.loads((run / "summary.json").read_text())["metrics"] for run in (tiny_run, bf16))
    for key in ("train/loss", "forward/ppl", "test/loss"):
        assert math.isclose(ours[key], fp32[key], rel_tol=0.03), (key, ours[key], fp32[key])
        assert ours[key] != fp32[key], key

