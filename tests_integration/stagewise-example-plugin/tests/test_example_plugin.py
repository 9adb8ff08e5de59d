"""Unit tests of the example plugin, through stagewise's public registry."""

from __future__ import annotations

import pytest
import torch

import stagewise


def test_components_are_registered():
    assert stagewise.get_router("example.loss_quantile").name == "example.loss_quantile"
    assert stagewise.get_loss("example.entropy_bonus").name == "example.entropy_bonus"
    assert {"example.mine_hard", "example.train_hard"} <= set(stagewise.get_stages())
    assert "example.hard_examples" in stagewise.get_recipes()


def test_router_calibrates_a_quantile_and_routes_by_it():
    router_cls = stagewise.get_router("example.loss_quantile")
    router = router_cls(router_cls.Options(hard_ratio=0.25))
    losses = torch.arange(8.0)  # 0, 1, ..., 7
    assert router.calibrate(losses) == {"threshold": 5.25}
    routing = router.route(losses)
    assert routing.masks["hard"].tolist() == [False] * 6 + [True] * 2
    assert routing.ratio("hard") == 0.25 and routing.ratio("easy") == 0.75
    assert router.state_dict() == {"threshold": 5.25}


def test_router_refuses_to_route_before_calibration():
    with pytest.raises(RuntimeError, match="calibrate"):
        stagewise.get_router("example.loss_quantile")().route(torch.zeros(3))


def test_entropy_bonus_is_minus_one_for_uniform_predictions():
    loss = stagewise.get_loss("example.entropy_bonus")()
    value = loss({"logits": torch.zeros(2, 3, 5)}, {}, state=None)
    torch.testing.assert_close(value, torch.tensor(-1.0))


def test_train_hard_without_a_mining_stage_is_refused_before_the_run(tmp_path):
    # was: the stages before it trained, then train_hard failed with no recipe file named
    recipe = stagewise.load_recipe("example.hard_examples", ["~stages.mine"])
    with pytest.raises(stagewise.ConfigError) as info:
        stagewise.run_recipe(recipe, out=tmp_path / "run", quiet=True)
    assert str(info.value).startswith(f"{recipe.source}: 1 problem:")
    assert info.value.problems == ["stages.hard: example.train_hard trains on the examples an earlier "
                                   "example.mine_hard stage found; add one before it"]
    assert not (tmp_path / "run").exists()


def test_a_mining_stage_after_train_hard_does_not_count(tmp_path):
    # the last stage, "test", made a mining stage: after "hard", not before it
    recipe = stagewise.load_recipe("example.hard_examples", ["~stages.mine", 'stages.test.use="example.mine_hard"',
                                                             'stages.test.router={use = "example.loss_quantile"}'])
    with pytest.raises(stagewise.ConfigError) as info:
        stagewise.run_recipe(recipe, out=tmp_path / "run", quiet=True)
    assert info.value.problems == ["stages.hard: example.train_hard trains on the examples an earlier "
                                   "example.mine_hard stage found; add one before it"]
