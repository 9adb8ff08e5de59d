"""The training loop's bookkeeping: logged learning rates, L-BFGS under the guard and the
fallback count, warnings under --quiet, and the batches an epoch draws."""

from __future__ import annotations

import io
import math
import re
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import read_records, read_summary

import stagewise
from stagewise.engine.runner import run_recipe
from stagewise.plugins import register_plugin, unregister_plugin
from stagewise.recipe import load_recipe

FALLBACK = 'losses=[{use="stagewise.cross_entropy", fallback_threshold=1.0}]'  # CE ~ 5: every batch is cut


class NanOnce(stagewise.Loss):
    """Cross-entropy, but NaN on the third training batch of stage phase2."""

    name = "looptest.nan_once"
    batches = 0  # phase2's training batches so far, counted by Snapshots

    def forward(self, outputs, batch, state):
        logits = outputs["logits"]
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch["target"].reshape(-1))
        return loss * float("nan") if self.training and NanOnce.batches == 3 else loss


class Snapshots:
    """The trained parameters before and after each step of phase2, with the step's loss."""

    def __init__(self):
        self.steps: list[tuple[float, bool]] = []  # (loss, parameters unchanged by the step)
        self.before: list[torch.Tensor] = []

    @stagewise.hookimpl
    def stagewise_register_losses(self, register):
        register(NanOnce)

    @stagewise.hookimpl
    def stagewise_before_step(self, state):
        NanOnce.batches += state.stage_name == "phase2"
        self.before = [p.detach().clone() for p in state.model.parameters()]

    @stagewise.hookimpl
    def stagewise_after_step(self, state, loss):
        if state.stage_name == "phase2":
            same = all(torch.equal(a, p) for a, p in zip(self.before, state.model.parameters(), strict=True))
            self.steps.append((loss, same))


def test_step_records_log_the_learning_rate_the_step_used(tiny, tmp_path):
    recipe = tiny('stages.phase1.schedule="warmup"', "stages.phase1.warmup_steps=3")
    run_dir = run_recipe(recipe, out=tmp_path / "run", quiet=True)
    lrs = [r["train/lr"] for r in read_records(run_dir, "step") if r["stage"] == "phase1"]
    assert lrs[:4] == pytest.approx([1e-2 / 3, 2e-2 / 3, 1e-2, 1e-2])  # (step + 1) / warmup_steps


def test_a_plateau_schedule_cuts_the_learning_rate_after_an_epoch_without_improvement(tiny, tmp_path):
    # so small an lr leaves val/loss where it was: torch's plateau needs a relative improvement of 1e-4
    recipe = tiny('stages.phase1.schedule="plateau"', "stages.phase1.lr=1e-7", "stages.phase1.max_epochs=3")
    run_dir = run_recipe(recipe, out=tmp_path / "run", quiet=True)
    losses = [r["val/loss"] for r in read_records(run_dir, "epoch") if r["stage"] == "phase1"]
    assert max(losses) - min(losses) < 1e-5 * losses[0]
    lrs = [r["train/lr"] for r in read_records(run_dir, "step") if r["stage"] == "phase1"]
    assert lrs[::5] == [1e-7, 1e-7, 5e-8]  # each epoch's first step: halved (plateau_factor) after epoch 1


def test_a_nonfinite_loss_leaves_lbfgs_parameters_unchanged(tiny, tmp_path):
    spy = Snapshots()
    NanOnce.batches = 0
    register_plugin(spy, "looptest")
    try:
        recipe = tiny('stages.phase2.optimizer="lbfgs"', "stages.phase2.lbfgs_max_iter=2",
                      'stages.phase2.losses=[{use="looptest.nan_once"}]')
        run_dir = run_recipe(recipe, out=tmp_path / "run", quiet=True)
    finally:
        unregister_plugin("looptest")
    skipped = [same for loss, same in spy.steps if math.isnan(loss)]
    assert skipped == [True]  # the one NaN step moved no parameter
    assert not all(same for loss, same in spy.steps if not math.isnan(loss))  # the others trained
    phase2 = read_summary(run_dir)["stages"]["phase2"]["metrics"]
    assert phase2["train/nonfinite"] == 1 and math.isfinite(phase2["val/loss"])


def test_lbfgs_counts_a_fallback_once_per_batch(tiny, tmp_path):
    recipe = tiny('stages.phase2.optimizer="lbfgs"', "stages.phase2.lbfgs_max_iter=3", f"stages.phase2.{FALLBACK}")
    run_dir = run_recipe(recipe, out=tmp_path / "run", quiet=True)
    epochs = [r for r in read_records(run_dir, "epoch") if r["stage"] == "phase2"]
    assert [r["warnings/fallback/cross_entropy"] for r in epochs] == [5, 5]  # 5 steps an epoch
    assert epochs[-1]["train/cross_entropy/fallbacks"] == 10


def test_quiet_keeps_warnings(tiny, tmp_path, capsys):
    run_recipe(tiny(f"stages.phase1.{FALLBACK}"), out=tmp_path / "run", quiet=True)
    err = capsys.readouterr().err
    assert "stagewise: warning: loss term 'cross_entropy'" in err
    assert "'fallback/cross_entropy' happened 5 times this epoch" in err


def test_an_epoch_draws_only_the_batches_it_trains_on(tiny, tmp_path, monkeypatch):
    from stagewise.builtins.train import TrainStage

    drawn = []
    original = TrainStage.train_batches

    def counted(self, state, epoch, start):
        for batch in original(self, state, epoch, start):
            drawn.append(epoch)
            yield batch

    monkeypatch.setattr(TrainStage, "train_batches", counted)
    run_recipe(tiny(), out=tmp_path / "run", quiet=True)
    assert len(drawn) == 20  # 2 stages x 2 epochs x max_steps_per_epoch 5, of a longer split


def test_an_epoch_s_last_step_leaves_its_checkpoint_to_the_epoch_s_end(tiny, tmp_path, monkeypatch):
    # a mid-epoch save after the last step would hold batch == steps_per_epoch, which no resume accepts
    from stagewise.engine.state import State

    saved = []
    save_checkpoint = State.save_checkpoint

    def spy(self, *, done, extra=None):
        if extra is not None:
            saved.append((self.stage_name, extra["loop"]["epoch"], extra["loop"]["batch"]))
        save_checkpoint(self, done=done, extra=extra)

    monkeypatch.setattr(State, "save_checkpoint", spy)
    run_recipe(tiny("run.checkpoint_every_n_steps=5"), out=tmp_path / "run", quiet=True)  # 5 steps an epoch
    assert saved == [("phase1", 1, 0), ("phase2", 1, 0)]  # the end of epoch 0 only: epoch 1's end is the stage's


def test_a_nonfinite_loss_leaves_adamw_parameters_unchanged_and_unrecorded(tiny, tmp_path):
    spy = Snapshots()
    NanOnce.batches = 0
    register_plugin(spy, "looptest")
    try:
        recipe = tiny('stages.phase2.losses=[{use="looptest.nan_once"}]')  # adamw, no grad_clip
        run_dir = run_recipe(recipe, out=tmp_path / "run", quiet=True)
    finally:
        unregister_plugin("looptest")
    skipped = [same for loss, same in spy.steps if math.isnan(loss)]
    assert skipped == [True]  # no backward, no optimizer step on the NaN batch
    assert not any(same for loss, same in spy.steps if not math.isnan(loss))  # every other step trains
    # a skipped batch is no optimizer step: 10 batches, 9 steps, each logged (log_every_n_steps = 1)
    steps = [r for r in read_records(run_dir, "step") if r["stage"] == "phase2"]
    assert [r["step"] for r in steps] == list(range(1, 10))
    epochs = [r for r in read_records(run_dir, "epoch") if r["stage"] == "phase2"]
    assert all(math.isfinite(r["train/loss"]) and math.isfinite(r["val/loss"]) for r in epochs)
    assert [r["train/nonfinite"] for r in epochs] == [1, 1]  # counted over the stage


def test_step_records_every_n_steps(tiny, tmp_path):
    run_dir = run_recipe(tiny("run.log_every_n_steps=3"), out=tmp_path / "run", quiet=True)
    steps = [(r["stage"], r["step"]) for r in read_records(run_dir, "step")]
    assert steps == [(stage, s) for stage in ("phase1", "phase2") for s in (3, 6, 9)]  # 10 steps a stage


def test_the_guard_stops_only_after_max_nonfinite_in_a_row(capsys):
    from stagewise.engine.guards import NonFiniteGuard, RateLimitedWarnings
    from stagewise.errors import TrainingError

    warnings = RateLimitedWarnings()
    guard = NonFiniteGuard(2, warnings)
    assert guard.check(float("nan"), "b0") is False
    assert guard.check(1.0, "b1") is True  # a finite loss ends the run of bad ones
    assert guard.check(float("inf"), "b2") is False  # 1 in a row, not 2
    with pytest.raises(TrainingError, match="2 non-finite losses in a row at b3"):
        guard.check(float("-inf"), "b3")
    assert guard.skipped == 3
    assert warnings.flush() == {"nonfinite_loss": 3}
    err = capsys.readouterr().err
    assert err.count("stagewise: warning: non-finite loss") == 1 and "'nonfinite_loss' happened 3 times" in err
    warnings.warn("once", "just once")
    assert warnings.flush() == {"once": 1} and "happened" not in capsys.readouterr().err  # no repeat line


class _AlwaysNan(stagewise.Loss):
    name = "looptest.always_nan"

    def forward(self, outputs, batch, state):
        return outputs["logits"].mean() * float("nan")


@pytest.mark.parametrize("optimizer", ["adamw", "lbfgs"])
def test_a_non_finite_loss_names_the_terms_that_made_it(tiny, tmp_path, capsys, optimizer):
    # was "non-finite loss (nan) at stage 'phase2' epoch 0 batch 0": which of the terms? (phase2: no grad_clip,
    # which lbfgs refuses)
    class Plugin:
        @stagewise.hookimpl
        def stagewise_register_losses(self, register):
            register(_AlwaysNan)

    register_plugin(Plugin(), "looptest")
    try:
        recipe = tiny('stages.phase2.losses=[{use="stagewise.cross_entropy"}, {use="looptest.always_nan", '
                      'weight=0.1}]', "stages.phase2.max_nonfinite=2", f'stages.phase2.optimizer="{optimizer}"')
        with pytest.raises(stagewise.TrainingError) as info:
            run_recipe(recipe, out=tmp_path / "run", quiet=True)
    finally:
        unregister_plugin("looptest")
    where = "stage 'phase2' epoch 0 batch {}, from term 'always_nan' = nan"
    assert str(info.value).startswith(f"2 non-finite losses in a row at {where.format(1)} (max_nonfinite = 2).")
    assert f"stagewise: warning: non-finite loss (nan) at {where.format(0)}; batch skipped" in capsys.readouterr().err


def test_lr_factor_warmup_then_cosine_down_to_min_lr():
    from types import SimpleNamespace

    from stagewise.engine.optim import lr_factor

    o = SimpleNamespace(schedule="cosine", warmup_steps=2, lr=1.0, min_lr=0.2)
    factor = lr_factor(o, total_steps=6)  # 2 warmup steps, then a half cosine over 4 steps
    floor = 0.2
    expected = [0.5, 1.0, 1.0, floor + 0.8 * (1 + math.cos(math.pi / 4)) / 2, floor + 0.4,
                floor + 0.8 * (1 + math.cos(3 * math.pi / 4)) / 2, floor, floor]
    assert [factor(s) for s in range(8)] == pytest.approx(expected)


@pytest.mark.parametrize("optimizer, own", [("sgd", {"momentum": 0.9}), ("adamw", {"betas": (0.8, 0.95)})])
def test_sgd_and_adamw_get_their_own_options_and_weight_decay(optimizer, own):
    # adamw's weight_decay was seen only at its default 0.01 (runs): a constant 0.01 in build_optimizer passed
    from types import SimpleNamespace

    from stagewise.engine.optim import build_optimizer

    o = SimpleNamespace(optimizer=optimizer, lr=0.1, weight_decay=0.05, **own)
    group = build_optimizer([torch.nn.Parameter(torch.zeros(2))], o).param_groups[0]
    assert {key: group[key] for key in ("lr", "weight_decay", *own)} == {"lr": 0.1, "weight_decay": 0.05, **own}


def test_lbfgs_gets_its_iterations_history_and_line_search():
    # was checked only by a run whose val/loss was not NaN: an lbfgs_max_iter or lbfgs_history ignored passed
    from types import SimpleNamespace

    from stagewise.engine.optim import build_optimizer

    o = SimpleNamespace(optimizer="lbfgs", lr=0.5, lbfgs_max_iter=3, lbfgs_history=7)
    group = build_optimizer([torch.nn.Parameter(torch.zeros(2))], o).param_groups[0]
    assert (group["lr"], group["max_iter"], group["history_size"], group["line_search_fn"]) == (0.5, 3, 7,
                                                                                                "strong_wolfe")


def test_drop_last_drops_the_short_last_batch_in_training_only():
    from types import SimpleNamespace

    from stagewise.engine.batches import count_batches, iterate_batches
    from stagewise.engine.distributed import DistInfo

    data = SimpleNamespace(batch_size=4, eval_batch_size=None, shuffle=False, drop_last=True, num_workers=0)
    split = [{"input": torch.tensor([i])} for i in range(10)]
    state = SimpleNamespace(recipe=SimpleNamespace(data=data), data={"train": split}, seed=0, stage_index=0,
                            dist=DistInfo(0, 1, 0), device=torch.device("cpu"))
    train = [b["input"].flatten().tolist() for b in iterate_batches(state, "train", train=True)]
    assert train == [[0, 1, 2, 3], [4, 5, 6, 7]] and count_batches(state, "train", train=True) == 2
    evaluation = [b["input"].flatten().tolist() for b in iterate_batches(state, "train", train=False)]
    assert evaluation[-1] == [8, 9] and count_batches(state, "train", train=False) == 3


def test_evaluation_batches_use_eval_batch_size():
    from types import SimpleNamespace

    from stagewise.engine.batches import count_batches, iterate_batches
    from stagewise.engine.distributed import DistInfo

    data = SimpleNamespace(batch_size=4, eval_batch_size=3, shuffle=False, drop_last=False, num_workers=0)
    split = [{"input": torch.tensor([i])} for i in range(10)]
    state = SimpleNamespace(recipe=SimpleNamespace(data=data), data={"valid": split}, seed=0, stage_index=0,
                            dist=DistInfo(0, 1, 0), device=torch.device("cpu"))
    sizes = [len(b["input"]) for b in iterate_batches(state, "valid", train=False)]
    assert sizes == [3, 3, 3, 1] and count_batches(state, "valid", train=False) == 4
    assert [len(b["input"]) for b in iterate_batches(state, "valid", train=True)] == [4, 4, 2]


def test_batches_of_a_dataset_without_a_length_name_its_type_and_what_it_lacks():
    # was a bare TypeError from len() ("object of type 'Stream' has no len()") naming neither the contract nor the fix
    from types import SimpleNamespace

    from stagewise.engine.batches import count_batches
    from stagewise.engine.distributed import DistInfo
    from stagewise.errors import PluginError

    class Stream(torch.utils.data.Dataset):
        def __getitem__(self, index):
            return {"input": torch.tensor([index])}

    data = SimpleNamespace(batch_size=4, eval_batch_size=None, shuffle=False, drop_last=False, num_workers=0)
    state = SimpleNamespace(recipe=SimpleNamespace(data=data), data={"train": Stream()}, seed=0, stage_index=0,
                            dist=DistInfo(0, 1, 0), device=torch.device("cpu"))
    with pytest.raises(PluginError, match=r"a dataset of type Stream has no len\(\); .* must define __len__"):
        count_batches(state, "train", train=True)


class Terminal(io.StringIO):
    """A stderr that says it is a terminal, so that progress bars are drawn into it."""

    def isatty(self):
        return True


def test_progress_bars_show_on_a_terminal_only_without_quiet_and_change_no_number(tiny, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")  # without it each run's stderr holds its no-plots hint, even with --quiet
    stderr, runs = {}, (("bar", False, Terminal()), ("quiet", True, Terminal()), ("log", False, io.StringIO()))
    for name, quiet, terminal in runs:
        monkeypatch.setattr(sys, "stderr", terminal)
        run_recipe(tiny(), out=tmp_path / name, quiet=quiet)
        stderr[name] = terminal.getvalue()
    assert "phase1: epoch 1/2" in stderr["bar"] and "phase2: epoch 2/2" in stderr["bar"]  # named after the stage
    # was: no bar while a split was evaluated, after each epoch and in an evaluate stage
    assert "phase1: evaluating valid" in stderr["bar"] and "test: evaluating test" in stderr["bar"]
    assert stderr["quiet"] == stderr["log"] == ""  # --quiet, or stderr not a terminal (a log file, a test)
    metrics = [read_summary(tmp_path / name)["metrics"] for name in stderr]
    assert metrics[0] == metrics[1] == metrics[2]



@pytest.mark.parametrize(("columns", "bar"), [(40, False), (120, True)])
def test_a_narrow_terminal_gets_the_time_left_and_loss_without_the_bar(tiny, tmp_path, monkeypatch, columns, bar):
    # was: tqdm cut the line at the terminal's width, losing "<remaining, ..., loss=...>" at its end
    monkeypatch.setenv("COLUMNS", str(columns))
    monkeypatch.setattr(sys, "stderr", Terminal())
    run_recipe(tiny("stages.phase2.max_epochs=1"), out=tmp_path / "run")
    shown = sys.stderr.getvalue()
    assert ("%|" in shown) == bar and ("phase1: epoch 1/2: 0/5 <" in shown) != bar
    from tqdm import tqdm

    from stagewise.engine.progress import COMPACT_BAR

    assert tqdm.format_meter(3, 5, 2.0, prefix="phase1: epoch 1/2", postfix="loss=5.2100", bar_format=COMPACT_BAR) \
        == "phase1: epoch 1/2: 3/5 <00:01, loss=5.2100"

def test_loading_the_data_is_said_on_a_terminal_before_it_starts(tiny, tmp_path, monkeypatch):
    # was: nothing was shown while a big file was read and tokenised, a silent minute before the first bar
    shown = {}
    for name, quiet in (("terminal", False), ("quiet", True)):
        monkeypatch.setattr(sys, "stderr", Terminal())
        run_recipe(tiny(), out=tmp_path / name, quiet=quiet)
        shown[name] = sys.stderr.getvalue()
    lines = shown["terminal"].splitlines()
    assert lines[0] == "stagewise: loading the data (stagewise.text) ..."
    assert lines[1].startswith("stagewise: data loaded in ") and lines[1].endswith("s")
    assert "loading the data" not in shown["quiet"]


def test_tokenising_a_text_file_shows_a_bar_on_a_terminal_only_without_quiet(tiny, tmp_path, monkeypatch):
    # was: "loading the data ..." alone while a big file was tokenised (300 MB: 15-25 s), no progress, no time left
    monkeypatch.setattr("stagewise.engine.progress.LOADING_DELAY", 0)  # a bar also for this small file
    (tmp_path / "corpus.txt").write_text("the cat sat on the mat\n" * 300)
    shown, runs = {}, (("bar", False, Terminal()), ("quiet", True, Terminal()), ("log", False, io.StringIO()))
    for name, quiet, terminal in runs:
        monkeypatch.setattr(sys, "stderr", terminal)
        run_recipe(tiny(f"data.path={tmp_path / 'corpus.txt'}"), out=tmp_path / name, quiet=quiet)
        shown[name] = terminal.getvalue()
    assert "stagewise: tokenising:   0%|" in shown["bar"] and "/6.90k [" in shown["bar"]  # the file's 6900 bytes
    assert "tokenising" not in shown["quiet"] + shown["log"]
    metrics = [read_summary(tmp_path / name)["metrics"] for name in shown]
    assert metrics[0] == metrics[1] == metrics[2]


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_reading_a_table_shows_a_bar_of_its_bytes(tmp_path, monkeypatch, kind):
    # was: "loading the data ..." alone while a CSV or JSONL file was read (2M rows: about 14 s), no time left
    from tqdm import tqdm

    from stagewise.data.loaders import CSVDataset, CSVOptions, JSONLDataset, JSONLOptions
    from stagewise.engine.progress import showing_loading_bars

    monkeypatch.setattr("stagewise.engine.progress.LOADING_DELAY", 0)  # a bar also for this small file
    (tmp_path / "t.csv").write_text("x,y\n" + "1.5,0\n" * 1000)
    (tmp_path / "t.jsonl").write_text('{"x": 1.5, "y": 0}\n' * 1000)
    options = {"csv": CSVOptions(path=str(tmp_path / "t.csv"), target=["y"]),
               "jsonl": JSONLOptions(path=str(tmp_path / "t.jsonl"), input_keys=["x"], target_keys=["y"])}[kind]

    def load():
        return (CSVDataset if kind == "csv" else JSONLDataset).from_recipe(options, seed=0)

    monkeypatch.setattr(sys, "stderr", Terminal())
    with showing_loading_bars(True):
        load()
    size = tqdm.format_sizeof((tmp_path / f"t.{kind}").stat().st_size)  # the file's bytes, as "19.0k"
    assert f"stagewise: reading t.{kind}:   0%|" in sys.stderr.getvalue() and f"/{size} [" in sys.stderr.getvalue()
    monkeypatch.setattr(sys, "stderr", Terminal())
    load()  # not shown unless the runner shows loading bars (a terminal, no --quiet)
    assert sys.stderr.getvalue() == ""


def test_a_warning_during_a_progress_bar_gets_its_own_line(monkeypatch):
    # was "base: epoch 1/2:   0%|   | 0/53 [00:00<?, ?it/s]stagewise: warning: ...": the warning appended to the bar
    from tqdm import tqdm

    from stagewise.engine.guards import RateLimitedWarnings

    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    with tqdm(range(3), desc="epoch 1/1", file=terminal) as bar:
        batches = iter(bar)  # held: a dropped iterator would close the bar
        next(batches)
        RateLimitedWarnings().warn("kind", "something")
    before = terminal.getvalue().split("stagewise: warning: something")[0]
    assert before.endswith("\r")  # the bar cleared, so the warning starts its line


def test_a_python_warning_during_a_run_on_a_terminal_gets_its_own_line_too(tiny, tmp_path, monkeypatch):
    # torch's or a plugin's warnings.warn went straight to stderr, glued to the bar as above
    import warnings

    from tqdm import tqdm

    from stagewise.engine import runner

    def stages_that_warn(state, first, saved):
        with tqdm(range(3), desc="epoch 1/1") as bar:
            batches = iter(bar)
            next(batches)
            warnings.warn("careful", UserWarning, stacklevel=1)

    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    monkeypatch.setattr(runner, "_run_stages", stages_that_warn)
    shown = warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        runner.run_recipe(tiny(), out=tmp_path / "run")
        assert warnings.showwarning is shown  # put back when the run ends
    before, after = terminal.getvalue().split("UserWarning: careful")
    assert re.fullmatch(rf"{re.escape(__file__)}:\d+: ", before.rsplit("\r", 1)[1])  # the bar cleared first
    assert after.startswith("\n")


class _WarnsTwice(stagewise.Stage):
    name = "looptest.warns_twice"

    def run(self, state):
        for _ in range(2):
            state.warnings.warn("odd", "something odd")
        return {}


def test_warnings_a_stage_raises_outside_an_epoch_count_for_that_stage_not_the_next_epoch(tiny_recipe_path,
                                                                                          tmp_path, capsys):
    class Warns:
        @stagewise.hookimpl
        def stagewise_register_stages(self, register):
            register(_WarnsTwice)

    recipe = tmp_path / "warns.toml"
    text = tiny_recipe_path.read_text()
    phase2 = text.index('[[stages]]\nname = "phase2"')
    recipe.write_text(text[:phase2] + '[[stages]]\nname = "odd"\nuse = "looptest.warns_twice"\n\n' + text[phase2:])
    register_plugin(Warns(), "looptest")
    try:
        run_dir = run_recipe(load_recipe(recipe), out=tmp_path / "run", quiet=True)
    finally:
        unregister_plugin("looptest")
    assert read_summary(run_dir)["stages"]["odd"]["metrics"] == {"warnings/odd": 2}
    assert not any("warnings/odd" in r for r in read_records(run_dir, "epoch"))  # phase2's epochs did not warn
    err = capsys.readouterr().err
    assert err.count("something odd") == 1 and "'odd' happened 2 times in stage 'odd'" in err


def test_position_problems_name_each_damaged_metrics_table():
    """A checkpoint's ``loop`` table as save() writes it passes; damaged best/last metrics are named one by one."""
    from dataclasses import asdict

    from stagewise.engine.loop import Position, position_problems

    assert position_problems(asdict(Position())) == []
    damaged = {**asdict(Position()), "best_metrics": {1.0}, "last_metrics": {"val/loss": {1, 2}, 3: 1.0}}
    assert position_problems(damaged) == [
        "loop.best_metrics: expected a table",
        "loop.best_metrics: a set, not a number, string, list or table",
        "loop.last_metrics.val/loss: a set, not a number, string, list or table",
        "loop.last_metrics: key 3 is not a string",
    ]


def test_a_monitor_the_stage_does_not_report_lists_the_stage_s_metrics(tiny, tmp_path):
    with pytest.raises(stagewise.ConfigError) as info:
        run_recipe(tiny("stages.phase1.max_epochs=1", "stages.phase1.monitor=val/nope"), out=tmp_path / "run",
                   quiet=True)
    assert info.value.problems == [
        "stages.phase1.monitor: 'val/nope' is not a metric of this stage; metrics: train/cross_entropy, "
        "train/cross_entropy/weight, train/cross_entropy/weighted, train/loss, train/lr, val/acc, val/loss, val/ppl"]


class RefusesInSetup(stagewise.Loss):
    """A term that finds a problem only on the built model (Loss.setup)."""

    name = "testing.refuses_in_setup"

    def setup(self, state):
        raise stagewise.ConfigError(["needs a model this one is not"])


@pytest.mark.parametrize("kept", ["phase1", "test"])  # a stagewise.train stage, a stagewise.evaluate one
def test_a_stage_name_set_cannot_address_is_named_by_position_in_run_time_problems_too(tiny, tmp_path, kept):
    # was: problems found once the stage ran named it stages.p.1 (a path --set cannot address), while
    # the recipe's problems before the run name it stages[0]; now both name it as named_paths does
    import types

    plugin = types.SimpleNamespace(stagewise_register_losses=stagewise.hookimpl(
        lambda register: register(RefusesInSetup, "testing.refuses_in_setup")))
    register_plugin(plugin, "testing_refuses")
    try:
        dropped = [f"~stages.{name}" for name in ("phase1", "phase2", "test") if name != kept]
        recipe = tiny(*dropped, f"stages.{kept}.checkpoint=p1",
                      f'stages.{kept}.losses=[{{use="testing.refuses_in_setup", name="odd"}}]',
                      f'stages.{kept}.name="p.1"')
        with pytest.raises(stagewise.ConfigError) as info:
            run_recipe(recipe, out=tmp_path / "run", quiet=True)
    finally:
        unregister_plugin("testing_refuses")
    assert info.value.problems == ["stages[0].losses.odd: needs a model this one is not"]


def test_a_monitor_of_a_stage_set_cannot_address_names_the_stage_by_position(tiny, tmp_path):
    recipe = tiny("~stages.phase2", "~stages.test", "stages.phase1.max_epochs=1", "stages.phase1.checkpoint=p1",
                  "stages.phase1.monitor=val/nope", 'stages.phase1.name="p.1"')
    with pytest.raises(stagewise.ConfigError) as info:
        run_recipe(recipe, out=tmp_path / "run", quiet=True)
    assert info.value.problems[0].startswith("stages[0].monitor: 'val/nope' is not a metric of this stage")
