"""stagewise.train's options are checked before the run writes anything, naming the recipe file."""

from __future__ import annotations

import pytest

from stagewise.engine.runner import run_recipe
from stagewise.errors import ConfigError


def _problems(recipe, tmp_path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        run_recipe(recipe, out=tmp_path / "run", quiet=True)
    assert str(info.value).startswith(f"{recipe.source}: ")  # the file, not just "recipe"
    assert not (tmp_path / "run").exists()
    return info.value.problems


def test_globs_are_checked_against_the_model_at_each_stage(tiny, tmp_path):
    # phase2 grows the model to 3 layers: layers.2.* exists there, layers.3.* nowhere
    recipe = tiny('stages.phase1.train=["layers.2.*"]', 'stages.phase2.freeze=["layers.3.*"]')
    problems = _problems(recipe, tmp_path)
    assert [p.split(";")[0] for p in problems] == ["stages[0].train: 'layers.2.*' matches no parameter",
                                                   "stages[1].freeze: 'layers.3.*' matches no parameter"]


def test_two_terms_of_one_name(tiny, tmp_path):
    ce = '{use="stagewise.cross_entropy"}'
    problems = _problems(tiny(f"stages.phase1.losses=[{ce}, {ce}]"), tmp_path)
    assert problems == ["stages[0].losses: two terms are named 'cross_entropy'; set a distinct 'name'"]


def test_a_term_s_target_must_be_in_the_data(tiny, tmp_path):
    bad = '[{use="stagewise.cross_entropy", target="label"}]'
    problems = _problems(tiny(f"stages.phase1.losses={bad}", f"stages.test.losses={bad}"), tmp_path)
    hint = "target 'label' is not in the data's examples, which hold: 'input', 'target'; set this term's target"
    assert [p.split(": ", 1) for p in problems] == [["stages[0].losses[0]", f"{hint} to one of them"],
                                                    ["stages[2].losses[0]", f"{hint} to one of them"]]


@pytest.mark.parametrize("monitor", ["valid/loss", "train/los", "train/best_epoch"])
def test_a_monitor_the_stage_cannot_make(tiny, tmp_path, monitor):
    (problem,) = _problems(tiny(f'stages.phase1.monitor="{monitor}"'), tmp_path)
    assert problem.startswith(f"stages[0].monitor: {monitor!r} is not a metric this stage makes")
    assert "train/cross_entropy" in problem


def test_train_metrics_can_be_monitored(tiny, tmp_path):
    recipe = tiny('stages.phase1.monitor="train/cross_entropy"', 'stages.phase1.schedule="plateau"',
                  'stages.phase1.eval_split=""')
    assert (run_recipe(recipe, out=tmp_path / "run", quiet=True) / "summary.json").exists()


def test_plateau_without_evaluation_needs_a_train_metric(tiny, tmp_path):
    (problem,) = _problems(tiny('stages.phase1.schedule="plateau"', 'stages.phase1.eval_split=""'), tmp_path)
    assert problem.startswith("stages[0].monitor: 'val/loss' needs evaluation, but eval_split is \"\"")


def test_patience_without_evaluation(tiny, tmp_path):
    (problem,) = _problems(tiny("stages.phase1.patience=1", 'stages.phase1.eval_split=""'), tmp_path)
    assert problem.startswith("stages[0].patience: early stopping compares `monitor` after each evaluation")


def test_lbfgs_is_refused_under_torchrun(tiny, tmp_path, monkeypatch):
    from stagewise.engine.runner import check_stages

    recipe = tiny('stages.phase2.optimizer="lbfgs"')
    data = recipe.data.component().from_recipe(recipe.data.options, seed=recipe.run.seed)
    check_stages(recipe, data)  # one process: fine
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets; checked before any process group is used
    with pytest.raises(ConfigError) as info:
        check_stages(recipe, data)
    assert info.value.problems[0].startswith("stages[1].optimizer: 'lbfgs' cannot run under torchrun (2 processes)")


@pytest.mark.parametrize("overrides, message", [
    (["stages.phase1.ema_momentum=0.9", "stages.phase1.ema_momentum_end=1.5"],
     "ema_momentum_end must be in [0, 1], got 1.5"),
    (["stages.phase1.ema_momentum_end=0.99"], "ema_momentum_end needs ema_momentum"),
])
def test_ema_momentum_end_is_validated(tiny, overrides, message):
    with pytest.raises(ConfigError) as info:
        tiny(*overrides)
    assert any(message in p for p in info.value.problems)


def test_a_term_switched_on_later_cannot_be_monitored(tiny, tmp_path):
    # train/<term> is missing from the epochs before start_epoch: the first epoch end would fail
    later = '{use="stagewise.cross_entropy", name="late", start_epoch=1}'
    recipe = tiny(f'stages.phase1.losses=[{{use="stagewise.cross_entropy"}}, {later}]',
                  'stages.phase1.monitor="train/late"')
    (problem,) = _problems(recipe, tmp_path)
    assert problem.startswith("stages[0].monitor: 'train/late' is not a metric this stage makes in every epoch")
    assert "train/cross_entropy" in problem and "train/late" not in problem.split("one of")[1]


@pytest.mark.parametrize("override, message", [
    ("stages.phase1.grad_clip=0.0", "grad_clip must be > 0, got 0.0"),
    ("stages.phase1.patience=0", "patience must be >= 1, got 0"),
    ('stages.phase1.schedule="warmup"', "schedule 'warmup' needs warmup_steps > 0"),
    ("stages.phase1.max_epochs=0", "max_epochs must be >= 1, got 0"),
    ("run.log_every_n_steps=0", "log_every_n_steps must be >= 1, got 0"),
])
def test_option_values_are_validated(tiny, override, message):
    with pytest.raises(ConfigError) as info:
        tiny(override)
    assert any(message in p for p in info.value.problems), info.value.problems


def test_freeze_takes_parameters_out_of_train():
    import torch

    from stagewise.engine.params import select_parameters

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    selected = select_parameters(model, ["*"], ["0.*"], "stages[0]", "r.toml")
    assert [name for name, _ in selected] == ["1.weight", "1.bias"]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == {
        "0.weight": False, "0.bias": False, "1.weight": True, "1.bias": True}
    with pytest.raises(ConfigError, match="train/freeze leave no parameter to train"):
        select_parameters(model, ["0.*"], ["0.*"], "stages[0]", "r.toml")
