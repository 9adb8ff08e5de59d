"""Loss terms: built-ins, weight schedules, adaptive fallback, rate-limited warnings."""

from __future__ import annotations

import types
from dataclasses import dataclass

import pytest
import torch
from conftest import read_records, read_summary

import stagewise
from stagewise import plugins
from stagewise.builtins.losses import MSE, CrossEntropy, CrossEntropyOptions, OutputOptions
from stagewise.engine.runner import run_recipe
from stagewise.errors import ConfigError, PluginError
from stagewise.specs import LossSpec


def test_weight_schedule_reproduces_the_seed_ramp():
    # the Koopman seed: 0 until epoch 5 (0-based), then linear steps of w_max / 6
    spec = LossSpec(use="stagewise.mse", weight=0.05, start_epoch=5, ramp_epochs=6)
    weights = [spec.weight_at(e) for e in range(10)]
    assert weights[:5] == [0.0] * 5
    assert weights[5:] == pytest.approx([0.05 / 6, 0.1 / 6, 0.025, 0.2 / 6, 0.25 / 6])
    capped = LossSpec(use="stagewise.mse", weight=0.05, ramp_epochs=2, cap=0.03)
    assert [capped.weight_at(e) for e in range(3)] == [0.025, 0.03, 0.03]


def test_loss_spec_rejects_bad_values():
    with pytest.raises(ValueError, match=r"cap: must be >= 0 and finite, got -1\.0"):
        LossSpec(use="stagewise.mse", cap=-1.0)
    with pytest.raises(ValueError, match="fallback_factor"):
        LossSpec(use="stagewise.mse", fallback_factor=2.0)
    with pytest.raises(ValueError, match="start_epoch: must be >= 0, got -1"):
        LossSpec(use="stagewise.mse", start_epoch=-1)
    with pytest.raises(ValueError, match="ramp_epochs: must be >= 0, got -2"):
        LossSpec(use="stagewise.mse", ramp_epochs=-2)


def test_a_nan_fallback_threshold_is_refused():
    # was: accepted; no term value is <= nan, so every batch of the term had its weight cut
    with pytest.raises(ValueError, match=r"^fallback_threshold: must be a number \(leave it out for no fallback\), "
                                         r"got nan$"):
        LossSpec(use="stagewise.mse", fallback_threshold=float("nan"))
    assert LossSpec(use="stagewise.mse", fallback_threshold=-1.0).fallback_threshold == -1.0  # a term may be < 0


@pytest.mark.parametrize("key", ["weight", "cap"])
def test_an_infinite_weight_or_cap_is_refused(key):
    with pytest.raises(ValueError, match=rf"{key}: must be >= 0 and finite, got inf"):
        LossSpec(use="stagewise.mse", **{key: float("inf")})


def test_a_weight_past_float32_is_refused():
    # was: accepted; every weighted loss was inf, so each batch was skipped until max_nonfinite stopped the run
    with pytest.raises(ValueError, match=r"^weight: must be at most 3\.403e\+38 \(the largest float32; losses are "
                                         r"float32\), got 1e\+300$"):
        LossSpec(use="stagewise.mse", weight=1e300)
    assert LossSpec(use="stagewise.mse", weight=3e38).weight == 3e38


def test_cross_entropy_sums_ignore_padding():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 2.0], [5.0, 0.0]]])
    batch = {"target": torch.tensor([[0, 0, -100]])}
    sums = CrossEntropy(CrossEntropyOptions()).eval_sums({"logits": logits}, batch, None)
    assert sums["acc"] == (1.0, 2.0) and sums["loss"][1] == 2.0
    means = {k: s / n for k, (s, n) in sums.items()}
    assert CrossEntropy().summarize(means)["ppl"] == pytest.approx(torch.tensor(means["loss"]).exp().item())


def test_cross_entropy_accuracy_leaves_out_a_padding_id_the_model_predicts():
    # with ignore_index = 0 (a pad id) a padded position the model "gets right" is no correct answer
    logits = torch.tensor([[[2.0, 0.0], [0.0, 2.0], [5.0, 0.0]]])
    batch = {"target": torch.tensor([[1, 1, 0]])}
    sums = CrossEntropy(CrossEntropyOptions(ignore_index=0)).eval_sums({"logits": logits}, batch, None)
    assert sums["acc"] == (1.0, 2.0) and sums["loss"][1] == 2.0


def test_outputs_are_chosen_by_key_and_exit_layer():
    outputs = {"heads": {"a": torch.zeros(2, 3)}, "exit_logits": {1: torch.ones(2, 3)}, "logits": torch.ones(2, 3)}
    ce = CrossEntropy(CrossEntropyOptions(output="heads.a"))
    assert ce(outputs, {"target": torch.tensor([0, 1])}, None) == pytest.approx(torch.log(torch.tensor(3.0)))
    assert CrossEntropy(CrossEntropyOptions(at_layer=1)).needs().exit_layers == {1}
    # a user's error, found once the model has run: a one-line message, not a KeyError traceback
    with pytest.raises(ConfigError, match=r"output 'heads.b': the model's outputs have no 'b' \(keys there: 'a'\)"):
        CrossEntropy(CrossEntropyOptions(output="heads.b"))(outputs, {"target": torch.tensor([0, 1])}, None)
    with pytest.raises(ConfigError, match=r"have no 'x' \(keys there: none: it is a tensor\)"):
        CrossEntropy(CrossEntropyOptions(output="logits.x"))(outputs, {"target": torch.tensor([0, 1])}, None)
    mse = MSE(OutputOptions(output="heads.a"))
    assert mse(outputs, {"target": torch.ones(2, 3)}, None) == 1.0


@pytest.mark.parametrize("stage", ["phase1", "test"])  # a training stage's step, an evaluation
def test_an_output_the_model_lacks_names_the_term_and_the_recipe_file(tiny, tmp_path, stage):
    recipe = tiny(f'stages.{stage}.losses=[{{use="stagewise.cross_entropy", output="nope"}}]', "~stages.phase2")
    with pytest.raises(ConfigError) as info:
        run_recipe(recipe, out=tmp_path / "run", quiet=True)
    assert str(info.value).startswith(f"{recipe.source}: 1 problem")
    assert info.value.problems == [f"stages.{stage}.losses.cross_entropy: output 'nope': the model's outputs have "
                                   f"no 'nope' (keys there: 'logits'); set the term's output to one of them"]


@dataclass
class ConstantOptions:
    value: float = 100.0


class Constant(stagewise.Loss):
    """A term that is always ``value`` (with a zero gradient path into the model)."""

    name = "testing.constant"
    Options = ConstantOptions

    def forward(self, outputs, batch, state):
        return {"big": outputs["logits"].sum() * 0.0 + self.options.value, "zero": outputs["logits"].sum() * 0.0}


class ConstantPlugin:
    @stagewise.hookimpl
    def stagewise_register_losses(self, register):
        register(Constant, "testing.constant")


@pytest.fixture
def constant_loss():
    plugins.register_plugin(ConstantPlugin(), "testing")
    yield
    plugins.unregister_plugin("testing")


def test_fallback_cuts_the_weight_and_warns_once_per_epoch(constant_loss, tiny, tmp_path, capsys):
    losses = ('stages.phase1.losses=[{use="stagewise.cross_entropy"}, {use="testing.constant", weight=0.5, '
              'start_epoch=1, fallback_threshold=8.0, fallback_factor=0.01}]')
    run_dir = run_recipe(tiny(losses), out=tmp_path / "run", quiet=False)
    epochs = [r for r in read_records(run_dir, "epoch") if r["stage"] == "phase1"]
    assert "train/constant/weight" not in epochs[0]  # weight 0 in epoch 0: not computed at all
    assert epochs[1]["train/constant/weight"] == pytest.approx(0.005)
    assert epochs[1]["train/constant/fallbacks"] == 5 and epochs[1]["warnings/fallback/constant"] == 5
    assert epochs[1]["train/constant/big"] == 100.0 and epochs[1]["train/constant"] == 100.0
    assert epochs[1]["train/loss"] == pytest.approx(epochs[1]["train/cross_entropy"] + 0.5, rel=1e-6)
    # each term's share of the loss: its weight (cut by the fallback) times its value, 0.005 * 100
    assert epochs[1]["train/constant/weighted"] == pytest.approx(0.5)
    assert epochs[1]["train/cross_entropy/weighted"] == pytest.approx(epochs[1]["train/cross_entropy"])
    err = capsys.readouterr().err
    assert err.count("loss term 'constant' = 100 > fallback_threshold 8.0") == 1
    assert "'fallback/constant' happened 5 times this epoch" in err
    assert read_summary(run_dir)["stages"]["phase1"]["metrics"]["val/constant/loss"] == 100.0


class Returns(stagewise.Loss):
    """A term whose forward returns what ``RETURNS[kind]`` makes of the logits (B, T, V)."""

    name = "testing.returns"
    kind = ""

    def forward(self, outputs, batch, state):
        return RETURNS[self.kind](outputs["logits"])


RETURNS = {
    "per-token": lambda logits: logits.pow(2).mean(-1),  # (B, T): forgot to reduce
    "float": lambda logits: logits.pow(2).mean().item(),  # cut from the graph
    "part": lambda logits: {"ok": logits.mean(), "bad": logits.mean(-1)},
    "no parts": lambda logits: {},  # their sum, the int 0: trained, an AttributeError; evaluated, a loss of 0
}


@pytest.mark.parametrize("kind, what", [("per-token", "a tensor of shape (4, 8)"), ("float", "a float"),
                                        ("part", "part 'bad': a tensor of shape (4, 8)"),
                                        ("no parts", "a dict of no parts")])
@pytest.mark.parametrize("stage", ["phase1", "test"])  # training, and evaluation on its own
def test_a_loss_returning_no_scalar_tensor_is_one_error_naming_it(tiny, tmp_path, monkeypatch, kind, what, stage):
    # was a traceback from deep in the loop: "a Tensor with 32 elements cannot be converted to Scalar"
    monkeypatch.setattr(Returns, "kind", kind)
    plugins.register_plugin(types.SimpleNamespace(stagewise_register_losses=stagewise.hookimpl(
        lambda register: register(Returns, "testing.returns"))), "testing_returns")
    try:
        recipe = tiny(f'stages.{stage}.losses=[{{use="stagewise.cross_entropy"}}, {{use="testing.returns"}}]')
        with pytest.raises(PluginError) as info:
            run_recipe(recipe, out=tmp_path / "run", quiet=True)
    finally:
        plugins.unregister_plugin("testing_returns")
    assert str(info.value) == (f"loss 'testing.returns' returned {what}; Loss.forward must return a scalar tensor "
                               f"(reduce it, e.g. with .mean()) or a dict of named scalar tensors")


def test_token_nll_is_the_per_token_cross_entropy_shaped_like_the_target():
    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(3, 5, 7, generator=g), torch.randint(0, 7, (3, 5), generator=g)
    nll = stagewise.loss.token_nll(logits, target)
    expected = -torch.log_softmax(logits, -1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    assert nll.shape == target.shape and torch.allclose(nll, expected, atol=1e-6)
    assert torch.equal(stagewise.loss.token_nll(logits[0], target[0]), nll[0])  # (T, V) works too, row for row


class OwnParameter(stagewise.Loss):
    """A term with a parameter of its own whose gradient is huge, and no gradient path into the model."""

    name = "testing.own_parameter"

    def setup(self, state):
        self.p = torch.nn.Parameter(torch.ones(()))

    def forward(self, outputs, batch, state):
        return 1e6 * self.p ** 2 + outputs["logits"].sum() * 0.0


class OwnParameterPlugin:
    def __init__(self):
        self.grads = []  # (stage, the term's gradient after each step's clipping)

    @stagewise.hookimpl
    def stagewise_register_losses(self, register):
        register(OwnParameter, "testing.own_parameter")

    @stagewise.hookimpl
    def stagewise_after_step(self, state):
        if "own_parameter" in state.terms:
            self.grads.append((state.stage_name, state.terms["own_parameter"].p.grad.item()))


def test_grad_clip_bounds_a_term_s_own_parameters_apart_from_the_model(tiny, tmp_path):
    plugin = OwnParameterPlugin()
    plugins.register_plugin(plugin, "testing_own")
    try:
        alone = run_recipe(tiny(), out=tmp_path / "alone", quiet=True)
        terms = '[{use="stagewise.cross_entropy"}, {use="testing.own_parameter", weight=1.0}]'
        with_term = run_recipe(tiny(f"stages.phase1.losses={terms}"), out=tmp_path / "with", quiet=True)
    finally:
        plugins.unregister_plugin("testing_own")
    # phase1 clips at 1.0: the term's gradient (2e6) is clipped on its own, so the model's steps,
    # and the language model's validation loss, are exactly those of the run without the term
    val = [read_summary(run)["stages"]["phase1"]["metrics"]["val/loss"] for run in (alone, with_term)]
    assert val[0] == val[1]
    # ... and the term's own gradient (2e6 p, p near 1) is cut to the norm 1.0 at each of the 10 steps
    assert plugin.grads == [("phase1", pytest.approx(1.0, rel=1e-6))] * 10


def test_fallback_cuts_only_a_term_above_its_threshold_and_counts_only_first_evaluations():
    from types import SimpleNamespace

    from stagewise.engine.guards import RateLimitedWarnings
    from stagewise.engine.objective import TermWeights

    spec = LossSpec(use="stagewise.mse", fallback_threshold=2.0, fallback_factor=0.1)
    state = SimpleNamespace(warnings=RateLimitedWarnings(silent=True))
    weights = TermWeights([spec], state)
    assert weights.effective("mse", 0.5, 2.0) == 0.5  # at the threshold: not above it
    assert weights.effective("mse", 0.5, 3.0) == pytest.approx(0.05)
    assert weights.effective("mse", 0.5, 3.0, count=False) == pytest.approx(0.05)  # a re-evaluation: cut too
    assert weights.fallbacks == {"mse": 1} and state.warnings.counts == {"fallback/mse": 1}


def test_fallback_leaves_a_nan_term_to_the_non_finite_guard_and_shows_a_value_above_its_threshold(capsys):
    from types import SimpleNamespace

    from stagewise.engine.guards import RateLimitedWarnings
    from stagewise.engine.objective import TermWeights

    spec = LossSpec(use="stagewise.mse", fallback_threshold=2.0, fallback_factor=0.1)
    weights = TermWeights([spec], SimpleNamespace(warnings=RateLimitedWarnings()))
    # NaN is not above the threshold: the batch is skipped as non-finite, not counted a fallback
    assert weights.effective("mse", 0.5, float("nan")) == 0.5 and weights.fallbacks == {"mse": 0}
    assert capsys.readouterr().err == ""  # was: "loss term 'mse' = nan > fallback_threshold 2.0"
    assert weights.effective("mse", 0.5, 2.0001) == pytest.approx(0.05)
    # was "= 2 > fallback_threshold 2.0": four digits hid what made it larger
    assert "loss term 'mse' = 2.0001 > fallback_threshold 2.0;" in capsys.readouterr().err


def test_mse_eval_sums_count_every_value():
    pred = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    target = torch.zeros(2, 3)
    total, count = MSE().eval_sums({"output": pred}, {"target": target}, None)["loss"]
    assert (total, count) == (14.0, 6.0)  # the mean, 14 / 6, is F.mse_loss's
    assert total / count == pytest.approx(MSE()({"output": pred}, {"target": target}, None).item())


def test_a_term_of_parts_is_their_sum_and_perplexity_stays_finite():
    import math

    from stagewise.engine.objective import split_term
    from stagewise.loss import perplexity

    parts = {"a": torch.tensor(1.5), "b": torch.tensor(2.0)}
    total, same = split_term(parts)
    assert total.item() == 3.5 and same is parts
    assert perplexity(math.log(4.0)) == pytest.approx(4.0)
    assert perplexity(1e4) == math.exp(700.0)  # a diverged loss: capped, not an OverflowError


class Buggy(stagewise.Loss):
    """A plugin's term with a bug in its forward."""

    name = "testing.buggy"

    def forward(self, outputs, batch, state):
        return [outputs["logits"].mean()][7]  # IndexError


@pytest.mark.parametrize("use, error, note", [
    ("testing.buggy", IndexError, "in stage 'phase1' (testing.buggy term of stagewise.train), from stagewise-buggy "
                                  "0.3: report it to that plugin"),
    ("stagewise.cross_entropy", TypeError, "in stage 'phase1' (stagewise.cross_entropy term of stagewise.train)"),
    ("testing.returns", PluginError, None)], ids=["plugin-term", "core-term", "stagewise-error"])
def test_a_bug_in_a_stage_keeps_its_traceback_with_a_note_naming_stage_term_and_plugin(tiny, tmp_path, monkeypatch,
                                                                                       use, error, note):
    module = types.ModuleType(__name__)  # the plugin's module: this file's code is the plugin's
    module.stagewise_register_losses = stagewise.hookimpl(lambda register: [register(Buggy), register(Returns)])
    monkeypatch.setattr(Returns, "kind", "per-token")
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", None)  # a bug in core's term: "None is not callable"
    plugins.register_plugin(module, "testing_buggy", "stagewise-buggy", "0.3")
    try:
        with pytest.raises(error) as info:
            run_recipe(tiny(f'stages.phase1.losses=[{{use="{use}"}}]'), out=tmp_path / "run", quiet=True)
    finally:
        plugins.unregister_plugin("testing_buggy")
    assert getattr(info.value, "__notes__", [None]) == [note]  # a StagewiseError says it all: no note


def test_a_single_term_s_weight_scales_the_loss_it_trains_on(tiny, tmp_path):
    # a first term of weight 1 is taken as it is (no 0 + 1·L ops); any other weight must still multiply it
    run_recipe(tiny('stages.phase1.losses=[{use="stagewise.cross_entropy", weight=0.5}]'), out=tmp_path / "run",
               quiet=True)
    epochs = [r for r in read_records(tmp_path / "run", "epoch") if r["stage"] == "phase1"]
    assert [r["train/cross_entropy/weight"] for r in epochs] == [0.5, 0.5]
    assert [r["train/loss"] for r in epochs] == [r["train/cross_entropy/weighted"] for r in epochs]  # 0.5 · CE
