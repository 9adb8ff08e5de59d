"""The Koopman loss works on any model that exposes per-layer hidden states through core's
interface (``forward_batch(batch, Needs(hidden=True))["hidden"]`` and ``logits_from_hidden``):
core's transformer and, when it is installed, the LEGO model of stagewise-lego-ashem."""

from __future__ import annotations

import json
import math
import tomllib

import pytest

from stagewise.engine.runner import run_recipe
from stagewise.recipe import recipe_from_table

RECIPE = """
[run]
name = "koopman_any_model"
seed = 1
threads = 1

[data]
use = "stagewise.text"
seq_len = 8
batch_size = 4
max_tokens = 400
max_vocab = 200

[model]
use = "{model}"
n_layer = 3
n_embd = 16
n_head = 2
ffn_hidden = 32

[[stages]]
name = "main"
use = "stagewise.train"
lr = 1e-2
max_epochs = 2
max_steps_per_epoch = 3

[[stages.losses]]
use = "stagewise.cross_entropy"

[[stages.losses]]
use = "koopman.operator"
name = "koopman"
weight = 0.1
koopman_dim = 8
steps = 2

[[stages]]
name = "forward"
use = "koopman.forward_eval"
replace_layers = 2
"""

MODELS = {
    "stagewise.transformer": None,
    "lego_ashem.deep_supervision_transformer": "stagewise_lego_ashem",
}


def final_metrics(model: str, out) -> dict:
    recipe = recipe_from_table(tomllib.loads(RECIPE.format(model=model)), f"{model}.toml", [])
    run_dir = run_recipe(recipe, out=out, quiet=True)
    return json.loads((run_dir / "summary.json").read_text())["metrics"]


@pytest.mark.parametrize("model", sorted(MODELS))
def test_koopman_term_trains_and_forward_mode_runs(model, tmp_path):
    if MODELS[model] is not None:
        pytest.importorskip(MODELS[model])
    metrics = final_metrics(model, tmp_path / "run")
    parts = {k: metrics[f"train/koopman/{k}"] for k in ("lifted", "reconstruction", "state")}
    assert all(math.isfinite(v) and v > 0 for v in parts.values()), parts
    assert metrics["train/koopman/weight"] == pytest.approx(0.1)  # a mean over steps
    assert metrics["forward/replaced_layers"] == 2
    assert math.isfinite(metrics["forward/koopman_ppl"]) and metrics["forward/koopman_ppl"] > 1


def test_the_lego_model_gives_the_term_exactly_core_s_hidden_states(tmp_path):
    """The LEGO model is core's transformer (same parameters, same initialisation) plus an exit:
    with the same recipe and seed, every number the Koopman term and forward mode report must be
    the same on both. A LEGO model whose hidden states differed from core's (taken after the
    final norm, or off by one layer) would change them."""
    pytest.importorskip("stagewise_lego_ashem")
    core = final_metrics("stagewise.transformer", tmp_path / "core")
    lego = final_metrics("lego_ashem.deep_supervision_transformer", tmp_path / "lego")
    assert "train/koopman/lifted" in core and "forward/koopman_ppl" in core
    assert lego == core
