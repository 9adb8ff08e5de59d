"""stagewise.train's options are checked before the run writes anything, naming the recipe file."""

from __future__ import annotations

import sys

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
    assert [p.split(";")[0] for p in problems] == ["stages.phase1.train: 'layers.2.*' matches no parameter",
                                                   "stages.phase2.freeze: 'layers.3.*' matches no parameter"]


def test_two_terms_of_one_name(tiny, tmp_path):
    ce = '{use="stagewise.cross_entropy"}'
    problems = _problems(tiny(f"stages.phase1.losses=[{ce}, {ce}]"), tmp_path)
    assert problems == ["stages.phase1.losses: two terms are named 'cross_entropy'; set a distinct 'name'"]


def test_a_term_s_target_must_be_in_the_data(tiny, tmp_path):
    bad = '[{use="stagewise.cross_entropy", target="label"}]'
    problems = _problems(tiny(f"stages.phase1.losses={bad}", f"stages.test.losses={bad}"), tmp_path)
    hint = "target 'label' is not in the data's examples, which hold: 'input', 'target'; set this term's target"
    assert [p.split(": ", 1) for p in problems] == [["stages.phase1.losses.cross_entropy", f"{hint} to one of them"],
                                                    ["stages.test.losses.cross_entropy", f"{hint} to one of them"]]


@pytest.mark.parametrize("monitor", ["valid/loss", "train/los", "train/best_epoch"])
def test_a_monitor_the_stage_cannot_make(tiny, tmp_path, monitor):
    (problem,) = _problems(tiny(f'stages.phase1.monitor="{monitor}"'), tmp_path)
    assert problem.startswith(f"stages.phase1.monitor: {monitor!r} is not a metric this stage makes")
    assert "train/cross_entropy" in problem


def test_train_metrics_can_be_monitored(tiny, tmp_path):
    recipe = tiny('stages.phase1.monitor="train/cross_entropy"', 'stages.phase1.schedule="plateau"',
                  'stages.phase1.eval_split=""')
    assert (run_recipe(recipe, out=tmp_path / "run", quiet=True) / "summary.json").exists()


def test_plateau_without_evaluation_needs_a_train_metric(tiny, tmp_path):
    (problem,) = _problems(tiny('stages.phase1.schedule="plateau"', 'stages.phase1.eval_split=""'), tmp_path)
    assert problem.startswith("stages.phase1.monitor: 'val/loss' needs evaluation, but eval_split is \"\"")


def test_patience_without_evaluation(tiny, tmp_path):
    (problem,) = _problems(tiny("stages.phase1.patience=1", 'stages.phase1.eval_split=""'), tmp_path)
    assert problem.startswith("stages.phase1.patience: early stopping compares `monitor` after each evaluation")


def test_lbfgs_is_refused_under_torchrun(tiny, tmp_path, monkeypatch):
    from stagewise.engine.runner import check_stages

    recipe = tiny('stages.phase2.optimizer="lbfgs"')
    data = recipe.data.component().from_recipe(recipe.data.options, seed=recipe.run.seed)
    check_stages(recipe, data)  # one process: fine
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets; checked before any process group is used
    with pytest.raises(ConfigError) as info:
        check_stages(recipe, data)
    assert info.value.problems[0].startswith("stages.phase2.optimizer: 'lbfgs' cannot run under torchrun (2 processes)")


@pytest.mark.parametrize("overrides, message", [
    (["stages.phase1.ema_momentum=0.9", "stages.phase1.ema_momentum_end=1.5"],
     "stages.phase1.ema_momentum_end: must be in [0, 1], got 1.5"),
    (["stages.phase1.ema_momentum_end=0.99"], "stages.phase1.ema_momentum_end: needs ema_momentum"),
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
    assert problem.startswith("stages.phase1.monitor: 'train/late' is not a metric this stage makes in every epoch")
    assert "train/cross_entropy" in problem and "train/late" not in problem.split("one of")[1]


@pytest.mark.parametrize("override, message", [
    ("stages.phase1.grad_clip=0.0", "stages.phase1.grad_clip: must be > 0, got 0.0"),
    ("stages.phase1.patience=0", "stages.phase1.patience: must be >= 1, got 0"),
    ('stages.phase1.schedule="warmup"', "stages.phase1.warmup_steps: schedule 'warmup' needs warmup_steps > 0"),
    ("stages.phase1.max_epochs=0", "stages.phase1.max_epochs: must be >= 1, got 0"),
    ("run.log_every_n_steps=0", "run.log_every_n_steps: must be >= 1, got 0"),
])
def test_option_values_are_validated(tiny, override, message):
    with pytest.raises(ConfigError) as info:
        tiny(override)
    assert any(message in p for p in info.value.problems), info.value.problems


def test_freeze_takes_parameters_out_of_train(tiny):
    import torch

    from stagewise.engine.params import select_parameters

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    selected = select_parameters(model, ["*"], ["0.*"], "stages[0]", tiny())
    assert [name for name, _ in selected] == ["1.weight", "1.bias"]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == {
        "0.weight": False, "0.bias": False, "1.weight": True, "1.bias": True}
    with pytest.raises(ConfigError, match="train/freeze leave no parameter to train"):
        select_parameters(model, ["0.*"], ["0.*"], "stages[0]", tiny())


# --- fuzzing findings: bad values must be refused before the run writes anything -------------------
# Each of these was accepted by validation and then either raised a raw Python exception from
# torch/itertools/nn.ModuleDict mid-run (after RUN_DIR existed), or trained on nonsense.

def _refused(tiny, tmp_path, *overrides) -> list[str]:
    """A ConfigError (from loading or from run_recipe's checks), with no run directory written."""
    with pytest.raises(ConfigError) as info:
        run_recipe(tiny(*overrides), out=tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists(), "the run directory was written before the error"
    return info.value.problems


def _one_term(**options) -> str:
    body = ", ".join(f"{k}={v}" for k, v in options.items())
    return f'stages.phase1.losses=[{{use="stagewise.cross_entropy", {body}}}]'


@pytest.mark.parametrize(("overrides", "key"), [
    # torch.optim raises ValueError at the first training stage (after RUN_DIR exists): a traceback
    (["stages.phase1.weight_decay=-1"], "weight_decay"),
    (["stages.phase1.weight_decay=nan"], "weight_decay"),
    (["stages.phase1.betas=[1.0, 0.999]"], "betas"),
    (["stages.phase1.betas=[nan, 0.9]"], "betas"),
    (['stages.phase1.optimizer="sgd"', "stages.phase1.momentum=-1"], "momentum"),
    (['stages.phase1.schedule="plateau"', "stages.phase1.plateau_factor=1.0"], "plateau_factor"),
    # itertools.islice raises ValueError
    (["stages.phase1.max_steps_per_epoch=-1"], "max_steps_per_epoch"),
    # every term weighted 0 in an epoch: "element 0 of tensors does not require grad" at backward()
    ([_one_term(weight=0)], "weight"),
    ([_one_term(cap=0)], "cap"),
    ([_one_term(start_epoch=5)], "start_epoch"),
    # nn.ModuleDict refuses the term name: KeyError traceback
    ([_one_term(name='""')], "name"),
    ([_one_term(name='"a.b"')], "name"),
    # F.cross_entropy raises RuntimeError
    ([_one_term(label_smoothing=2.0)], "label_smoothing"),
    # stagewise.evaluate's split "" passes the split check, then state.batches("") raises KeyError
    (['stages.test.split=""'], "split"),
    # DataLoader raises ValueError at the first batch
    (["data.num_workers=-1"], "num_workers"),
    # torch.set_num_threads raises RuntimeError (nothing written, but a traceback)
    (["run.threads=-1"], "threads"),
])
def test_bad_values_are_refused_before_the_run_not_a_traceback(tiny, tmp_path, overrides, key):
    problems = _refused(tiny, tmp_path, *overrides)
    assert any(key in p for p in problems), problems


@pytest.mark.parametrize(("overrides", "key"), [
    # was accepted: the run ends with exit 0 and a NaN model (val/loss nan, test/ppl nan)
    (["stages.phase1.lr=inf"], "lr"),
    (['stages.phase1.schedule="cosine"', "stages.phase1.min_lr=nan"], "min_lr"),
    # was accepted: cosine decays to a negative lr (gradient ascent; train/lr -0.495)
    (['stages.phase1.schedule="cosine"', "stages.phase1.min_lr=-1"], "min_lr"),
    # was accepted: a negative plateau factor would make the lr negative; NaN, NaN
    (['stages.phase1.schedule="plateau"', "stages.phase1.plateau_factor=-1"], "plateau_factor"),
    (['stages.phase1.schedule="plateau"', "stages.phase1.plateau_factor=nan"], "plateau_factor"),
    (["stages.phase1.plateau_patience=-1"], "plateau_patience"),
    (['stages.phase1.optimizer="sgd"', "stages.phase1.momentum=nan"], "momentum"),
    (["stages.phase1.weight_decay=inf"], "weight_decay"),
    # was accepted: 0 is read as "unset" and the whole split runs
    (["stages.phase1.max_steps_per_epoch=0"], "max_steps_per_epoch"),
    # a NaN/Inf weight makes every batch non-finite: skipped, or the run aborts after 10 (RUN_DIR written)
    ([_one_term(weight="nan")], "weight"),
    ([_one_term(weight="inf")], "weight"),
    # min(weight, nan) is the weight: the cap is silently ignored
    ([_one_term(cap="nan")], "cap"),
    # torch skips smoothing for a value <= 0 or NaN: silently ignored
    ([_one_term(label_smoothing=-1.0)], "label_smoothing"),
    ([_one_term(label_smoothing="nan")], "label_smoothing"),
    # was accepted: the evaluate stage reports nothing at all
    (["stages.test.losses=[]"], "losses"),
    # -1 makes every step a checkpoint (step % -1 == 0)
    (["run.checkpoint_every_n_steps=-1"], "checkpoint_every_n_steps"),
    # eval_batch_size 0 silently means batch_size; -1 gives no evaluation batch at all, and the run
    # fails after RUN_DIR exists with "stages.phase1.monitor: 'val/loss' is not a metric of this stage"
    (["data.eval_batch_size=0"], "eval_batch_size"),
    (["data.eval_batch_size=-1"], "eval_batch_size"),
    # RMSNorm with eps = inf outputs zeros: the model cannot learn
    (["model.norm_eps=inf"], "norm_eps"),
    (["model.rope_base=inf"], "rope_base"),
])
def test_nonsense_values_are_refused_not_trained_on(tiny, tmp_path, overrides, key):
    problems = _refused(tiny, tmp_path, *overrides)
    assert any(key in p for p in problems), problems


@pytest.mark.parametrize(("override", "globs"), [("stages.phase1.train=[]", "train = [], freeze = []"),
                                             ('stages.phase1.freeze=["*"]', "train = ['*'], freeze = ['*']")])
def test_a_stage_with_nothing_to_train_is_refused_before_the_run_dir(tiny, tmp_path, override, globs):
    # was: "train/freeze leave no parameter to train", but only once the stage started (RUN_DIR written)
    problems = _refused(tiny, tmp_path, override)
    assert problems == [f"stages.phase1: train/freeze leave no parameter to train ({globs})"]


@pytest.mark.parametrize(("override", "problem"), [
    ('stages.test.checkpoint="phase1"',
     "stages: the checkpoint 'phase1' is used by more than one stage; checkpoints must be unique"),
    ('stages.phase1.checkpoint="last"',
     "checkpoint name 'last': 'last' is reserved for the resume checkpoint; choose another"),
])
def test_checkpoint_names_must_not_collide(tiny, tmp_path, override, problem):
    # both ran: the later stage overwrote checkpoints/phase1.pt, or a stage's own checkpoint was
    # checkpoints/last.pt, which every later stage (and --resume) overwrites
    [refused] = _refused(tiny, tmp_path, override)
    assert refused.endswith(problem), refused


def test_tensorboard_missing_is_refused_before_the_run_dir(tiny, tmp_path, monkeypatch):
    # was: refused only by the before_run hook, after the run directory was written; and skipped
    # wherever TensorBoard is installed, as in every nox session
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed: find_spec gives None
    problems = _refused(tiny, tmp_path, "run.tensorboard=true")
    assert any("tensorboard" in p.lower() for p in problems), problems


@pytest.mark.parametrize(("overrides", "key"), [
    (['stages.phase1.optimizer="lbfgs"', "stages.phase1.lbfgs_history=0"], "lbfgs_history"),  # IndexError
    (['stages.phase1.optimizer="lbfgs"', "stages.phase1.lbfgs_history=-1"], "lbfgs_history"),  # IndexError
    (['stages.phase1.optimizer="lbfgs"', "stages.phase1.lbfgs_max_iter=0"], "lbfgs_max_iter"),  # trains nothing
])
def test_lbfgs_options_are_validated(tmp_path, overrides, key):
    from conftest import TINY

    from stagewise.recipe import load_recipe

    path = tmp_path / "no_clip.toml"
    path.write_text(TINY.replace("grad_clip = 1.0\n", ""))  # lbfgs refuses grad_clip
    problems = _refused(lambda *o: load_recipe(path, list(o)), tmp_path, *overrides)
    assert any(key in p for p in problems), problems


def test_mse_on_integer_targets_is_refused_before_the_run(tiny, tmp_path):
    # was: RuntimeError "shape '[4, 8, 196]' is invalid for input of size 32" at the first batch
    (problem,) = _refused(tiny, tmp_path, 'stages.phase1.losses=[{use="stagewise.mse"}]')
    assert problem.startswith("stages.phase1.losses.mse: stagewise.mse needs float targets, but the data's 'target' "
                              "holds torch.int64 values")


def test_a_model_too_big_to_allocate_is_a_recipe_error(tiny, tmp_path):
    # was: RuntimeError "DefaultCPUAllocator: can't allocate memory" from the model's constructor;
    # the rotary tables of a huge max_seq_len are one such allocation
    (problem,) = _refused(tiny, tmp_path, "model.max_seq_len=1000000000000")
    assert problem.startswith("model (stagewise.transformer): its options ask for") and "lower the sizes" in problem
    # block weights beyond the machine's memory are refused when the recipe loads, before that
    # (this case was the allocation error above until the size check came)
    (problem,) = _refused(tiny, tmp_path, "model.ffn_hidden=1000000000000")
    assert problem.startswith("model.n_layer: 2 blocks of n_embd = 16 and ffn_hidden = 1000000000000 need")


def test_run_out_running_into_a_file_is_a_recipe_error(tiny, tmp_path):
    # was: NotADirectoryError when the default run folder was made under it
    (tmp_path / "notes").write_text("kept")
    recipe = tiny(f'run.out="{tmp_path / "notes" / "runs"}"')
    with pytest.raises(ConfigError) as info:
        run_recipe(recipe, quiet=True)
    assert info.value.problems == [f"run.out: {tmp_path / 'notes'} is a file, not a folder; set run.out to a "
                                   f"folder (or pass --out)"]
    assert (tmp_path / "notes").read_text() == "kept"


def test_a_bad_run_value_names_only_its_own_key(tiny, tmp_path):
    # was: "checkpoint_every_n_steps and threads must be >= 0 ..., got 0 and -1" for a bad threads alone
    assert _refused(tiny, tmp_path, "run.threads=-1") == ["run.threads: must be >= 0 (0 = torch's default), got -1"]


def test_a_problem_a_term_finds_as_its_stage_starts_names_the_term_and_the_file(tiny, tmp_path):
    import stagewise
    from stagewise.builtins.losses import CrossEntropy
    from stagewise.plugins import register_plugin, unregister_plugin

    class WidthOf3(CrossEntropy):  # a problem only the built model shows, found in setup
        def setup(self, state):
            raise ConfigError([f"the model's {state.recipe.model.options.n_embd} features are not a multiple of 3"])

    class Plugin:
        @stagewise.hookimpl
        def stagewise_register_losses(self, register):
            register(WidthOf3, "setuptest.width")

    register_plugin(Plugin(), "setuptest")
    try:
        # the terms came from --set, so the problem says so (the file did not hold them)
        with pytest.raises(ConfigError, match=r"^\S*tiny\.toml: 1 problem:\n  - stages\.phase1\.losses\.width \(from "
                                              r"--set stages\.phase1\.losses=\[\{use = \"setuptest\.width\"\}\]\): "
                                              r"the model's 16 features are not a multiple of 3$"):
            run_recipe(tiny('stages.phase1.losses=[{use = "setuptest.width"}]'), out=tmp_path / "run", quiet=True)
    finally:
        unregister_plugin("setuptest")


def test_checking_a_stage_s_globs_builds_the_model_without_moving_a_random_number():
    # the check builds the model on the meta device; a plugin model that draws as it is built must not shift the run
    import random
    from types import SimpleNamespace

    import numpy as np
    import torch

    from stagewise.engine.params import parameter_names_at

    class Drawing:
        @staticmethod
        def from_recipe(options, data):
            random.random(), np.random.rand(), torch.rand(1, device="cpu")  # one draw from each generator
            return torch.nn.Linear(2, 1)

    def seed():
        torch.manual_seed(0), np.random.seed(0), random.seed(0)

    def draws():
        return torch.rand(1).item(), np.random.rand(), random.random()

    seed()
    expected = draws()
    seed()
    recipe = SimpleNamespace(model=SimpleNamespace(component=lambda: Drawing), model_options_at=lambda index: None)
    assert parameter_names_at(recipe, 0, None) == ["weight", "bias"]
    assert draws() == expected


def _no_full_batch(n: int) -> str:
    return (f"data.batch_size: the train split's {n} examples make no full batch of 1000 with data.drop_last = true, "
            f"so stagewise.train would train nothing; lower data.batch_size to at most {n}, set "
            f"data.drop_last = false or give more training data")


def _under_torchrun(recipe, monkeypatch, world) -> tuple[int, list[str]]:
    """The train split's size and the problems the stage checks find with ``world`` processes ([]: none)."""
    from stagewise.engine.runner import check_stages

    data = recipe.data.component().from_recipe(recipe.data.options, seed=recipe.run.seed)
    n = len(data["train"])
    monkeypatch.setenv("WORLD_SIZE", str(world(n)))  # what torchrun sets
    try:
        check_stages(recipe, data)
    except ConfigError as exc:
        return n, exc.problems
    return n, []


def test_a_train_split_too_small_for_one_batch_is_refused_before_the_run(tiny, tmp_path):
    # was: each epoch ran no step, and the run finished as if it had trained; both training stages find it
    recipe = tiny("data.batch_size=1000", "data.drop_last=true")
    n = len(recipe.data.component().from_recipe(recipe.data.options, seed=recipe.run.seed)["train"])
    assert _problems(recipe, tmp_path) == [_no_full_batch(n)]


def test_a_train_split_smaller_than_the_process_count_is_refused(tiny, monkeypatch):
    n, problems = _under_torchrun(tiny("data.batch_size=1000"), monkeypatch, world=lambda n: n + 1)
    assert problems == [f"data: the train split has {n} examples, fewer than the {n + 1} processes that each need "
                        f"one, so stagewise.train would train nothing; give more training data or launch fewer "
                        f"processes"]


def test_a_train_split_of_one_example_per_process_without_a_full_batch_names_drop_last(tiny, monkeypatch):
    # every process has its example: the batch is what is missing, not data
    recipe = tiny("data.batch_size=1000", "data.drop_last=true")
    n, problems = _under_torchrun(recipe, monkeypatch, world=lambda n: n)
    assert problems == [_no_full_batch(n)]


def test_a_batch_smaller_than_the_process_count_is_refused(tiny, monkeypatch):
    # was: ranks past the batch size got no share of any batch while the others trained: DDP broke off
    # ("Connection reset by peer") once the ranks with nothing to do had moved on
    recipe = tiny("data.batch_size=3")
    assert _under_torchrun(recipe, monkeypatch, world=lambda n: 3)[1] == []  # one example per process and batch
    assert _under_torchrun(recipe, monkeypatch, world=lambda n: 4)[1] == [
        "data.batch_size: 3 is smaller than the 4 processes torchrun launched, each of which takes a share of every "
        "batch; set data.batch_size to at least 4"]


def test_a_stage_whose_own_batches_are_none_stops_before_training(tiny, tmp_path):
    import stagewise
    from stagewise.errors import TrainingError
    from stagewise.plugins import register_plugin, unregister_plugin

    class NoneSelected(stagewise.TrainStage):  # as a stage training on a mined selection that came out empty
        def train_batches(self, state, epoch, start):
            return iter(())

        def batches_per_epoch(self, state):
            return 0

    class Plugin:
        @stagewise.hookimpl
        def stagewise_register_stages(self, register):
            register(NoneSelected, "emptytest.train")

    register_plugin(Plugin(), "emptytest")
    try:
        with pytest.raises(TrainingError, match=r"^stages\.phase2 \(emptytest\.train\): an epoch has no batch to "
                                                r"train on, so the stage would train nothing; give it more examples"):
            run_recipe(tiny('stages.phase2.use="emptytest.train"'), out=tmp_path / "run", quiet=True)
    finally:
        unregister_plugin("emptytest")
    assert not (tmp_path / "run" / "checkpoints" / "phase2.pt").exists()
