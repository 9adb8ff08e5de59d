"""Bad options fail with clear errors before anything trains."""

from __future__ import annotations

import pytest
from conftest import TINY_HYBRID, run_tiny, tiny_recipe
from stagewise_koopman.loss import KoopmanOptions

import stagewise


@pytest.mark.parametrize(("options", "message"), [
    ({"koopman_dim": 0}, "koopman_dim must be a positive integer, got 0"),
    ({"koopman_dim": -4}, "koopman_dim must be a positive integer, got -4"),
    ({"axis": "width"}, "axis must be one of 'depth', 'time', got 'width'"),
    ({"distance": "l3"}, "distance must be one of 'mse', 'smooth_l1', got 'l3'"),
    ({"steps": 0}, "steps must be >= 1, got 0"),
    ({"detach": "both"}, "detach must be one of 'none', 'source', 'target', got 'both'"),
    ({"dmd_rate": 0.0}, "dmd_rate must be in (0, 1], got 0.0"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        KoopmanOptions(**options)


def test_recipe_validation_reports_every_bad_key_at_once():
    bad = TINY_HYBRID.replace("koopman_dim = 8\n", 'koopman_dim = 0\naxis = "sideways"\n').replace(
        "ramp_epochs = 2\n", "ramp_epochs = 2\ncap = -0.1\n")
    with pytest.raises(stagewise.ConfigError) as info:
        tiny_recipe(bad)
    text = str(info.value)
    assert "stages[1].losses[1]" in text
    assert "koopman_dim must be a positive integer, got 0" in text
    assert "axis must be one of 'depth', 'time', got 'sideways'" in text


def test_negative_cap_is_refused_by_the_engine():
    with pytest.raises(stagewise.ConfigError, match="weight and cap must be >= 0"):
        tiny_recipe(TINY_HYBRID.replace("ramp_epochs = 2\n", "ramp_epochs = 2\ncap = -0.1\n"))


def test_layers_out_of_range_fail_before_the_first_step(tmp_path):
    bad = TINY_HYBRID.replace("steps = 2\n", "steps = 2\nlayers = [0, 3]\n")
    with pytest.raises(stagewise.ConfigError, match=r"layers \[3\] are out of range for axis 'depth'.*up to 2"):
        run_tiny(tmp_path / "run", bad)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert not any('"stage": "main"' in line and '"event": "step"' in line for line in lines)


def test_forward_eval_needs_an_earlier_koopman_term():
    no_term = TINY_HYBRID.replace('name = "koopman"\n', 'name = "other"\n')
    with pytest.raises(stagewise.ConfigError, match="no earlier stage trains a koopman.operator term named 'koopman'"):
        from stagewise.engine.runner import check_stages

        recipe = tiny_recipe(no_term)
        check_stages(recipe, recipe.data.component().from_recipe(recipe.data.options, seed=0))
