"""A run killed with SIGKILL and resumed ends with exactly the numbers of an uninterrupted run."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, RunsCode, read_records, read_summary

import stagewise
from stagewise.engine.checkpoint import FORMAT, load_checkpoint
from stagewise.engine.runner import run_recipe
from stagewise.errors import CheckpointError
from stagewise.plots import have_matplotlib
from stagewise.plugins import register_plugin, unregister_plugin
from stagewise.recipe import load_recipe
from stagewise.testing import resume_run, run_killed, run_stopped, run_uninterrupted, timeless_records

EVERY_3 = ["run.checkpoint_every_n_steps=3"]


@pytest.fixture(scope="module")
def whole_every_3(tmp_path_factory):
    """(the tiny recipe file, an uninterrupted child run of it with EVERY_3): one run for every kill point."""
    folder = tmp_path_factory.mktemp("whole")
    path = folder / "tiny.toml"
    path.write_text(TINY)
    run_uninterrupted(path, folder / "whole", EVERY_3)
    return path, folder / "whole"


@pytest.mark.parametrize("stage, step", [("phase1", 7), ("phase2", 4)])
def test_resume_after_sigkill_matches_uninterrupted_run(whole_every_3, tmp_path, stage, step):
    recipe_path, whole = whole_every_3
    killed = tmp_path / "killed"
    run_killed(recipe_path, killed, stage, step, EVERY_3)
    assert not (killed / "summary.json").exists()
    saved = load_checkpoint(killed / "checkpoints" / "last.pt")
    assert saved["stage_name"] == stage and not saved["stage_done"]  # died mid-stage

    resume_run(recipe_path, killed, EVERY_3)
    assert read_summary(killed)["metrics"] == read_summary(whole)["metrics"]
    assert timeless_records(killed) == timeless_records(whole)


def _tensorboard_scalars(run_dir) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """RUN_DIR's TensorBoard scalars as TensorBoard reads them (a restart's purge applied):
    (folder, tag) -> [(step, value), ...]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = {}
    for folder in sorted({path.parent for path in (run_dir / "tensorboard").rglob("events.out.tfevents.*")}):
        events = EventAccumulator(str(folder)).Reload()
        for tag in events.Tags()["scalars"]:
            scalars[folder.relative_to(run_dir).as_posix(), tag] = [(e.step, e.value) for e in events.Scalars(tag)]
    return scalars


def test_a_resumed_runs_tensorboard_holds_each_point_once_as_an_uninterrupted_run(tiny_recipe_path, tmp_path):
    pytest.importorskip("tensorboard")
    sets = ["run.tensorboard=true"]
    run_killed(tiny_recipe_path, tmp_path / "killed", "phase2", 8, sets)  # its last checkpoint: phase2's step 5
    resume_run(tiny_recipe_path, tmp_path / "killed", sets)
    run_uninterrupted(tiny_recipe_path, tmp_path / "whole", sets)
    whole = _tensorboard_scalars(tmp_path / "whole")
    assert [step for step, _ in whole["tensorboard/phase2/steps", "phase2/train/loss_step"]] == list(range(1, 11))
    assert [step for step, _ in whole["tensorboard/phase2/epochs", "phase2/val/loss"]] == [0, 1]
    assert _tensorboard_scalars(tmp_path / "killed") == whole  # was: phase2's steps 6, 7 (and 8) twice


def test_every_tensorboard_point_a_checkpoint_has_seen_is_on_disk_when_the_checkpoint_is_written(tiny, tmp_path,
                                                                                                monkeypatch):
    # was: the points could wait in the writer's queue; a kill just after the checkpoint lost them for good, as the
    # resumed run logs only what comes after it (a slow disk here; a writer that buffers until flushed loses more)
    pytest.importorskip("tensorboard")
    from tensorboard.summary.writer.record_writer import RecordWriter

    from stagewise.engine import checkpoint

    write_record, write_checkpoint = RecordWriter.write, checkpoint.write_checkpoint
    monkeypatch.setattr(RecordWriter, "write", lambda self, data: (time.sleep(0.02), write_record(self, data)))
    run_dir, behind = tmp_path / "run", []

    def checked_write_checkpoint(payload, paths):
        stage = payload["stage_name"]
        records = [r for r in read_records(run_dir) if r["stage"] == stage]
        logged = {"steps": [r["step"] for r in records if r["event"] == "step"],
                  "epochs": [r["epoch"] for r in records if r["event"] == "epoch"]}
        scalars = _tensorboard_scalars(run_dir)
        on_disk = {"steps": [s for s, _ in scalars.get((f"tensorboard/{stage}/steps", f"{stage}/train/loss_step"), [])],
                   "epochs": [e for e, _ in scalars.get((f"tensorboard/{stage}/epochs", f"{stage}/val/loss"), [])]}
        if on_disk != logged:
            behind.append((stage, logged, on_disk))
        write_checkpoint(payload, paths)

    monkeypatch.setattr(checkpoint, "write_checkpoint", checked_write_checkpoint)
    run_recipe(tiny("run.tensorboard=true", "run.checkpoint_every_n_steps=3"), out=run_dir, quiet=True)
    assert behind == []


def test_resume_refuses_a_changed_recipe_naming_each_changed_key_and_the_command_that_resumes(tiny, tmp_path):
    # was "(in: stages)": which key of which stage, and what to resume with, was left to the user to find
    run_dir = run_recipe(tiny(), out=tmp_path / "run", quiet=True)
    with pytest.raises(CheckpointError) as info:
        run_recipe(tiny("stages.phase1.lr=0.5", "run.log_every_n_steps=2"), resume=run_dir, quiet=True)
    assert str(info.value) == (
        f"{run_dir}: the recipe differs from the one this run started with: run.log_every_n_steps = 2 (the run "
        f"started with 1), stages.phase1.lr = 0.5 (the run started with 0.01). Resume with the --set overrides it "
        f"started with, or with the recipe it saved: stagewise run {run_dir / 'recipe.toml'} --resume {run_dir}")
    run_recipe(load_recipe(run_dir / "recipe.toml"), resume=run_dir, quiet=True)  # the advice works


def test_a_changed_recipe_shows_five_changed_keys_and_counts_the_others(tiny, tmp_path):
    from stagewise.engine.resume import check_same_recipe

    (tmp_path / "recipe.toml").write_text(tiny().to_toml())  # as the run wrote it
    five = ["run.log_every_n_steps=2",
            *(f"stages.{stage}.{key}=3" for stage in ("phase1", "phase2") for key in ("lr", "max_epochs"))]
    for sets, more in ((five, ""), (["run.seed=8", *five], " and 1 more")):
        with pytest.raises(CheckpointError) as info:
            check_same_recipe(tmp_path, tiny(*sets))
        shown = str(info.value).split("started with: ")[1].split(". Resume")[0]
        assert shown.count("(the run started with") == 5 and shown.endswith(f"){more}")


def test_corrupt_checkpoint_gives_a_clear_error(tiny, tmp_path):
    run_dir = run_recipe(tiny(), out=tmp_path / "run", quiet=True)
    last = run_dir / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # truncated
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        run_recipe(tiny(), resume=run_dir, quiet=True)


def test_foreign_file_is_not_a_checkpoint(tmp_path):
    import torch

    path = tmp_path / "x.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not a stagewise checkpoint"):
        load_checkpoint(path)


class _Stop(Exception):
    """Stands in for a kill: the run stops at once; its last checkpoint is what it leaves."""


class _Probe(stagewise.Loss):
    """Cross-entropy plus a small penalty on a parameter that ``setup`` draws at random."""

    name = "resumetest.probe"

    def setup(self, state):
        self.probe = torch.nn.Parameter(torch.randn(4))  # draws from the global RNG

    def forward(self, outputs, batch, state):
        logits = outputs["logits"]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), batch["target"].reshape(-1))
        return nll + 1e-3 * self.probe.pow(2).sum()


class _Interrupter:
    stop_at: tuple[str, int] | None = None  # (stage, step) after which the run stops

    @stagewise.hookimpl
    def stagewise_register_losses(self, register):
        register(_Probe)

    @stagewise.hookimpl
    def stagewise_after_step(self, state):
        if (state.stage_name, state.step) == self.stop_at:
            raise _Stop


def _stop(recipe, out, stage: str, step: int) -> Path:
    """Run ``recipe`` into ``out`` until step ``step`` of ``stage`` ends, as if killed there."""
    interrupter = _Interrupter()
    interrupter.stop_at = (stage, step)
    register_plugin(interrupter, "resumetest")
    try:
        with pytest.raises(_Stop):
            run_recipe(recipe, out=out, quiet=True)
    finally:
        unregister_plugin("resumetest")
    return out


@pytest.fixture
def stopped_and_resumed(tmp_path):
    """``run(recipe, stage, step)``: (a run stopped after ``step`` of ``stage`` and resumed, the
    same recipe run without a stop), both in this process."""
    interrupter = _Interrupter()
    register_plugin(interrupter, "resumetest")

    def run(recipe, stage, step):
        interrupter.stop_at = (stage, step)
        with pytest.raises(_Stop):
            run_recipe(recipe, out=tmp_path / "stopped", quiet=True)
        interrupter.stop_at = None
        run_recipe(recipe, resume=tmp_path / "stopped", quiet=True)
        return tmp_path / "stopped", run_recipe(recipe, out=tmp_path / "whole", quiet=True)

    try:
        yield run
    finally:
        unregister_plugin("resumetest")


# last checkpoint: phase1 step 6 is past the end of epoch 0 (5 steps); 7 and phase2's 4 are mid-epoch
@pytest.mark.parametrize("stage, step", [("phase1", 6), ("phase1", 7), ("phase2", 4)])
def test_resume_with_dropout_and_a_term_drawing_at_setup_matches(tiny, stopped_and_resumed, stage, step):
    recipe = tiny("run.checkpoint_every_n_steps=3", "model.dropout=0.1", "stages.phase1.restore_best=false",
                  "stages.phase2.restore_best=false",
                  'stages.phase1.losses=[{use="stagewise.cross_entropy"}, {use="resumetest.probe", weight=0.5}]')
    stopped, whole = stopped_and_resumed(recipe, stage, step)
    assert read_summary(stopped)["metrics"] == read_summary(whole)["metrics"]
    assert timeless_records(stopped) == timeless_records(whole)


def test_resume_mid_epoch_keeps_the_epoch_s_warning_counts(tiny, stopped_and_resumed):
    recipe = tiny("run.checkpoint_every_n_steps=3",
                  'stages.phase1.losses=[{use="stagewise.cross_entropy", fallback_threshold=1.0}]')
    stopped, whole = stopped_and_resumed(recipe, "phase1", 7)
    counts = [r["warnings/fallback/cross_entropy"] for r in read_records(stopped, "epoch") if r["stage"] == "phase1"]
    assert counts == [5, 5]  # every batch of both epochs is cut
    assert timeless_records(stopped) == timeless_records(whole)


class _NanEarly(stagewise.Loss):
    """Cross-entropy, but NaN for phase1's training batches of epoch 0 once a step has been taken
    (batches 1-4: four skipped in a row); deterministic across a resume."""

    name = "resumetest.nan_early"

    def forward(self, outputs, batch, state):
        logits = outputs["logits"]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), batch["target"].reshape(-1))
        skip = self.training and (state.stage_name, state.epoch, state.step) == ("phase1", 0, 1)
        return nll * float("nan") if skip else nll


class _EmaPull(stagewise.Loss):
    """Cross-entropy plus a pull of the model towards its EMA target: the loss depends on the target."""

    name = "resumetest.ema_pull"

    def forward(self, outputs, batch, state):
        logits = outputs["logits"]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), batch["target"].reshape(-1))
        pairs = zip(state.model.parameters(), state.target_model.parameters(), strict=True)
        return nll + 10.0 * sum((p - t).pow(2).sum() for p, t in pairs)


class _MoreLosses:
    @stagewise.hookimpl
    def stagewise_register_losses(self, register):
        register(_NanEarly)
        register(_EmaPull)


@pytest.fixture
def more_losses():
    register_plugin(_MoreLosses(), "resumetest_more")
    yield
    unregister_plugin("resumetest_more")


def test_resume_keeps_the_count_of_skipped_batches(tiny, stopped_and_resumed, more_losses):
    recipe = tiny('stages.phase1.losses=[{use="resumetest.nan_early"}]')
    stopped, whole = stopped_and_resumed(recipe, "phase1", 2)  # resumed from the end of epoch 0
    counts = [r["train/nonfinite"] for r in read_records(stopped, "epoch") if r["stage"] == "phase1"]
    assert counts == [4, 4]  # the stage's count, carried into epoch 1 across the resume
    assert timeless_records(stopped) == timeless_records(whole)


def test_resume_keeps_the_count_of_fallbacks(tiny, stopped_and_resumed):
    recipe = tiny('stages.phase1.losses=[{use="stagewise.cross_entropy", fallback_threshold=1.0}]')  # CE ~ 5: all cut
    stopped, whole = stopped_and_resumed(recipe, "phase1", 7)
    counts = [r["train/cross_entropy/fallbacks"] for r in read_records(stopped, "epoch") if r["stage"] == "phase1"]
    assert counts == [5, 10]  # the stage's count, carried into epoch 1 across the resume
    assert timeless_records(stopped) == timeless_records(whole)


class _StopAtCall:
    """Stops the run in its ``calls``-th after_step (skipped batches count): the checkpoint of the
    batch before it is what the run leaves."""

    def __init__(self, calls: int):
        self.calls = calls

    @stagewise.hookimpl
    def stagewise_after_step(self, state):
        self.calls -= 1
        if self.calls == 0:
            raise _Stop


def test_resume_keeps_the_guard_s_count_of_non_finite_losses_in_a_row(tiny, tmp_path, more_losses):
    # batches 1-4 of epoch 0 are NaN: the 4th in a row stops the run, also when resumed after the 2nd
    recipe = tiny("run.checkpoint_every_n_steps=1", "stages.phase1.max_nonfinite=4",
                  'stages.phase1.losses=[{use="resumetest.nan_early"}]')
    register_plugin(_StopAtCall(4), "resumetest_stop")  # in batch 3: last.pt is batch 2's, 2 NaN in a row
    try:
        with pytest.raises(_Stop):
            run_recipe(recipe, out=tmp_path / "run", quiet=True)
    finally:
        unregister_plugin("resumetest_stop")
    with pytest.raises(stagewise.TrainingError, match="4 non-finite losses in a row"):
        run_recipe(recipe, resume=tmp_path / "run", quiet=True)


class _Draws(stagewise.Stage):
    """A plugin stage that draws four numbers from torch's RNG and checkpoints after the second."""

    name = "resumetest.draws"
    stop = False  # stop, as if killed, after the mid-stage checkpoint

    def run(self, state):
        drawn = list(state.resume["drawn"]) if state.resume is not None else []
        while len(drawn) < 4:
            drawn.append(torch.rand(()).item())
            if len(drawn) == 2 and state.resume is None:
                state.save_checkpoint(done=False, extra={"drawn": drawn})
                if _Draws.stop:
                    raise _Stop
        return {"drawn/3": drawn[2], "drawn/4": drawn[3]}


class _DrawsPlugin:
    @stagewise.hookimpl
    def stagewise_register_stages(self, register):
        register(_Draws)


def test_a_plugin_stage_resumed_mid_way_draws_on_from_the_rng_state_it_saved(tiny_recipe_path, tmp_path,
                                                                             monkeypatch):
    path = tmp_path / "draws.toml"
    stage = '[[stages]]\nname = "draws"\nuse = "resumetest.draws"\n'
    path.write_text(tiny_recipe_path.read_text().split("[[stages]]")[0] + stage)  # the tiny data and model
    register_plugin(_DrawsPlugin(), "resumetest_draws")
    try:
        whole = run_recipe(load_recipe(path), out=tmp_path / "whole", quiet=True)
        monkeypatch.setattr(_Draws, "stop", True)
        with pytest.raises(_Stop):
            run_recipe(load_recipe(path), out=tmp_path / "stopped", quiet=True)
        monkeypatch.setattr(_Draws, "stop", False)
        stopped = run_recipe(load_recipe(path), resume=tmp_path / "stopped", quiet=True)
    finally:
        unregister_plugin("resumetest_draws")
    assert read_summary(stopped)["metrics"] == read_summary(whole)["metrics"]


def test_resume_keeps_the_ema_target(tiny, stopped_and_resumed, more_losses):
    recipe = tiny("run.checkpoint_every_n_steps=3", "stages.phase1.ema_momentum=0.9",
                  'stages.phase1.losses=[{use="resumetest.ema_pull"}]')
    stopped, whole = stopped_and_resumed(recipe, "phase1", 7)
    assert timeless_records(stopped) == timeless_records(whole)


def test_resume_between_stages_starts_the_next_stage(tiny, stopped_and_resumed):
    # no mid-epoch checkpoints: stopped in phase2's first epoch, last.pt is phase1's final one
    stopped, whole = stopped_and_resumed(tiny(), "phase2", 1)
    assert read_summary(stopped)["metrics"] == read_summary(whole)["metrics"]
    assert timeless_records(stopped) == timeless_records(whole)


def test_rng_state_round_trips_every_generator():
    import random

    import numpy as np

    from stagewise.engine.checkpoint import rng_state, set_rng_state

    saved = rng_state()
    first = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    set_rng_state(saved)
    again = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


def test_seed_everything_seeds_every_generator():
    # a stage's plugin code may draw from any of them: each must start again from the stage's seed
    import random

    import numpy as np

    from stagewise.engine.checkpoint import seed_everything

    def draws():
        return torch.rand(2).tolist(), np.random.rand(2).tolist(), [random.random() for _ in range(2)]

    seed_everything(2**32 + 5)  # numpy takes the seed modulo 2**32
    first = draws()
    seed_everything(2**32 + 5)
    assert draws() == first
    np.random.seed(5)
    assert np.random.rand(2).tolist() == first[1]


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    from stagewise.engine.checkpoint import atomic_write_bytes

    path = tmp_path / "last.pt"
    path.write_bytes(b"old")

    def fail(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(path, fail)
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


class _BigArtifact:
    """Hands phase2 on a 16 MB artifact, as lego-ashem's mine hands on its cache."""

    @stagewise.hookimpl
    def stagewise_before_stage(self, state, stage):
        if state.stage_name == "phase2":
            state.artifacts["resumetest.big"] = torch.arange(4 * 2**20, dtype=torch.float32)


def test_a_checkpoint_is_streamed_to_its_file_and_copied_never_held_serialised_in_memory(tiny, tmp_path,
                                                                                          monkeypatch):
    """Serialised into a bytes object (once, for <stage>.pt and last.pt), a checkpoint was a second
    in-memory copy of everything it holds; the Python heap's peak during a save now stays far below it."""
    import tracemalloc

    from stagewise.engine.state import State

    peaks, save = [], State.save_checkpoint

    def traced(self, **kwargs):
        tracemalloc.start()
        try:
            save(self, **kwargs)
            peaks.append((self.stage_name, tracemalloc.get_traced_memory()[1]))
        finally:
            tracemalloc.stop()

    monkeypatch.setattr(State, "save_checkpoint", traced)
    register_plugin(_BigArtifact(), "resumetest_big")
    try:
        run = run_recipe(tiny(), out=tmp_path / "run", quiet=True)
    finally:
        unregister_plugin("resumetest_big")
    big = [peak for stage, peak in peaks if stage in ("phase2", "test")]
    assert big and max(big) < 2**22, peaks  # a quarter of the artifact (was 19 MB; now 0.2 MB)
    checkpoints = run / "checkpoints"
    assert (checkpoints / "test.pt").read_bytes() == (checkpoints / "last.pt").read_bytes()
    assert torch.equal(load_checkpoint(checkpoints / "last.pt")["artifacts"]["resumetest.big"],
                       torch.arange(4 * 2**20, dtype=torch.float32))
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.pt", "phase1.pt", "phase2.pt", "test.pt"]


# --- fuzzing findings: run directories and checkpoints fed to --resume -------------------------------


@pytest.mark.parametrize("make, problem", [
    (lambda p: None, "does not exist"),
    (lambda p: p.write_text("x"), "is a file"),
    (lambda p: (p.mkdir(), (p / "notes.txt").write_text("kept")), "is not a run directory (it has no recipe.toml)"),
], ids=["missing", "a-file", "not-a-run"])
def test_resume_says_what_is_missing_and_what_to_do(tiny, tmp_path, make, problem):
    run = tmp_path / "run"
    make(run)
    with pytest.raises(CheckpointError) as info:  # was "run/checkpoints/last.pt: checkpoint not found"
        run_recipe(tiny(), resume=run, quiet=True)
    assert str(info.value) == (f"--resume {run}: {problem}; give the run directory of the run to continue (the "
                               f"folder that holds its recipe.toml, checkpoints/ and metrics.jsonl)")
    assert not run.is_dir() or [p.name for p in run.iterdir()] == ["notes.txt"]  # nothing written


@pytest.mark.parametrize("payload, problem", [
    (lambda marker: {"format": FORMAT, "recipe": RunsCode(marker)},
     "refused: the file holds Python objects (it refers to posix.system) that only an unsafe load (pickle) could "
     "read, and unpickling can run code"),
    (lambda marker: {"format": FORMAT, "model": {}}, "an incomplete stagewise checkpoint: it lacks recipe, "
                                                      "stage_index, stage_name, stage_done, model_options"),  # KeyError
], ids=["pickle", "missing-keys"])
def test_resume_refuses_a_checkpoint_stagewise_did_not_write(tiny, tmp_path, payload, problem):
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    last.parent.mkdir(parents=True)
    (tmp_path / "run" / "recipe.toml").write_text(tiny().to_toml())  # a run directory, whose last.pt is foreign
    torch.save(payload(tmp_path / "ran"), last)
    with pytest.raises(CheckpointError) as info:
        run_recipe(tiny(), resume=tmp_path / "run", quiet=True)
    assert str(info.value).startswith(f"{last}: {problem}") and "\n" not in str(info.value)
    assert not (tmp_path / "ran").exists()  # weights_only=True: the pickle never ran


def test_a_damaged_last_pt_resumes_from_a_stage_checkpoint_and_a_cut_metrics_line_is_dropped(tiny, tmp_path,
                                                                                             capsys):
    whole = run_recipe(tiny(), out=tmp_path / "whole", quiet=True)
    run = tmp_path / "run"
    shutil.copytree(whole, run)
    last = run / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    with pytest.raises(CheckpointError) as info:  # was the general advice: "copy that stage's checkpoint ..."
        run_recipe(tiny(), resume=run, quiet=True)
    assert str(info.value).startswith(f"{last}: the checkpoint is corrupt or truncated (")
    assert str(info.value).endswith(f"). Copy {run / 'checkpoints' / 'test.pt'} (stage 'test', the last one that "
                                    f"finished) over {last} to continue after that stage, or run the recipe again "
                                    f"with --out and a new folder")
    shutil.copy(run / "checkpoints" / "phase1.pt", last)  # the advice: resume from the end of phase1
    counted = load_checkpoint(last)["metrics_lines"]
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    # the file lost its end mid-line: the next record used to be glued onto the cut one
    (run / "metrics.jsonl").write_text("".join(lines[: counted - 1]) + lines[counted - 1][:20])
    run_recipe(tiny(), resume=run, quiet=True)
    assert (f"{run / 'metrics.jsonl'} holds {counted - 1} complete records, but the checkpoint counted {counted}"
            in capsys.readouterr().err)
    expected = timeless_records(whole)
    assert timeless_records(run) == expected[: counted - 1] + expected[counted:]  # every line is JSON again
    assert read_summary(run)["metrics"] == read_summary(whole)["metrics"]


def test_resume_cuts_a_long_runs_metrics_back_a_line_at_a_time(tmp_path):
    # was: the whole metrics.jsonl was read into memory (text and its lines) to cut it back, with
    # log_every_n_steps = 1 as large as the run was long
    import tracemalloc

    from stagewise.engine.rundir import RunDir

    lines = [json.dumps({"event": "step", "stage": "a", "step": i, "train/loss": 1.0}) + "\n" for i in range(40_000)]
    (tmp_path / "metrics.jsonl").write_text("".join(lines) + lines[0][:20], encoding="utf-8")  # its end cut short
    assert (tmp_path / "metrics.jsonl").stat().st_size > 2_000_000
    tracemalloc.start()
    try:
        run = RunDir.reopen(tmp_path, 30_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert run.lines == 30_000 and (tmp_path / "metrics.jsonl").read_text(encoding="utf-8") == "".join(lines[:30_000])
    assert peak < 500_000  # what a line takes, not the file's 2 MB
    assert RunDir.reopen(tmp_path, 40_000).lines == 30_000  # the file holds no more: a warning, not an invention


def test_a_damaged_last_pt_before_any_stage_finished_says_to_run_again_in_a_new_folder(tiny, tmp_path):
    # the advice was to copy a stage's checkpoint over last.pt, when no stage had one, "or start the run
    # again": --out refuses the run's folder, which is not empty
    run = _stop(tiny(), tmp_path / "stopped", "phase1", 7)  # after epoch 0's checkpoint, before phase1.pt
    last = run / "checkpoints" / "last.pt"
    assert [p.name for p in last.parent.glob("*.pt")] == ["last.pt"]
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with pytest.raises(CheckpointError) as info:
        run_recipe(tiny(), resume=run, quiet=True)
    assert str(info.value).endswith(f"). No stage of this run has finished, so no other checkpoint can continue it: "
                                    f"run the recipe again with --out and a new folder (or delete {run} first)")


def test_resuming_a_finished_run_resumes_nothing_and_a_lost_metrics_file_is_a_warning(tiny, tmp_path, capsys):
    run = run_recipe(tiny(), out=tmp_path / "run", quiet=True)
    checkpoints = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    (run / "metrics.jsonl").unlink()  # was a FileNotFoundError traceback
    run_recipe(tiny(), resume=run, quiet=False)
    captured = capsys.readouterr()
    assert f"{run} has finished all 3 stages: nothing to resume" in captured.out  # was "at stage 4/3"
    assert f"{run / 'metrics.jsonl'} holds 0 complete records, but the checkpoint counted" in captured.err
    assert (run / "metrics.jsonl").read_text() == ""
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} == checkpoints


def test_a_run_stopped_before_its_first_checkpoint_resumes_from_the_start(tiny, tmp_path):
    """Nothing to continue from: ``--resume`` runs the same recipe again in the run's folder (the
    folder is not empty, so ``--out`` refuses it) and ends with the uninterrupted run's numbers."""
    _stop(tiny(), tmp_path / "stopped", "phase1", 2)  # epoch 0 has 5 steps: no checkpoint yet
    assert not (tmp_path / "stopped" / "checkpoints" / "last.pt").exists()
    with pytest.raises(CheckpointError, match=r"recipe differs .*: stages\.phase1\.lr = 0\.5 \("):
        run_recipe(tiny("stages.phase1.lr=0.5"), resume=tmp_path / "stopped", quiet=True)

    stopped = run_recipe(tiny(), resume=tmp_path / "stopped", quiet=True)
    whole = run_recipe(tiny(), out=tmp_path / "whole", quiet=True)
    assert read_summary(stopped)["metrics"] == read_summary(whole)["metrics"]
    assert timeless_records(stopped) == timeless_records(whole)


def test_a_run_with_stage_checkpoints_but_no_last_pt_says_which_file_to_copy(tiny, tmp_path):
    run = run_recipe(tiny(), out=tmp_path / "run", quiet=True)
    last = run / "checkpoints" / "last.pt"
    last.unlink()
    with pytest.raises(CheckpointError) as info:
        run_recipe(tiny(), resume=run, quiet=True)
    # was "copy the latest checkpoints/<stage>.pt": which one is the latest was left to the user
    assert str(info.value) == (f"--resume {run}: there is no {last}, only the checkpoints of finished stages; copy "
                               f"{run / 'checkpoints' / 'test.pt'} (stage 'test', the last one that finished) over "
                               f"{last} to continue after that stage")


def test_run_killed_says_when_the_run_was_never_killed(tiny_recipe_path, tmp_path):
    with pytest.raises(AssertionError, match=r"to be killed at step 3 of 'nope' but exited with 0"):
        run_killed(tiny_recipe_path, tmp_path / "run", "nope", 3)
    assert (tmp_path / "run" / "summary.json").exists()  # the run finished: no stage 'nope' to stop in


def test_run_killed_kills_a_run_where_there_is_no_sigkill(tiny_recipe_path, tmp_path, monkeypatch):
    """As on Windows, which has no signals (was: AttributeError in the child, and in run_killed itself)."""
    from stagewise import testing

    monkeypatch.setattr(testing, "_KILLER", "import signal; del signal.SIGKILL\n" + testing._KILLER)
    monkeypatch.setattr(testing, "_KILLED", 137)
    run_killed(tiny_recipe_path, tmp_path / "killed", "phase2", 4, ["run.checkpoint_every_n_steps=3"])
    saved = load_checkpoint(tmp_path / "killed" / "checkpoints" / "last.pt")
    assert (saved["stage_name"], saved["stage_done"]) == ("phase2", False)  # died mid-stage, as SIGKILL leaves it


class _StageTracker:
    """The hooks.md tracker: logs a record as each stage starts, but not again for a stage a resumed
    run continues mid-way (``state.resume`` is set then)."""

    def __init__(self):
        self.calls = []

    @stagewise.hookimpl
    def stagewise_before_stage(self, state, stage):
        self.calls.append((stage.label, state.resume is not None))
        if state.resume is None:
            state.log("mytracker.stage_start", use=stage.name)


def test_before_stage_fires_again_for_the_stage_resumed_mid_way_with_state_resume_set(tiny, stopped_and_resumed):
    tracker = _StageTracker()
    register_plugin(tracker, "stagetracker")
    try:
        stopped, whole = stopped_and_resumed(tiny("run.checkpoint_every_n_steps=3"), "phase2", 4)
    finally:
        unregister_plugin("stagetracker")
    stopped_run, resumed_run, whole_run = tracker.calls[:2], tracker.calls[2:4], tracker.calls[4:]
    assert stopped_run == [("phase1", False), ("phase2", False)]
    assert resumed_run == [("phase2", True), ("test", False)]  # phase1 was finished: skipped, no call
    assert whole_run == [("phase1", False), ("phase2", False), ("test", False)]
    assert timeless_records(stopped) == timeless_records(whole)  # one stage_start record per stage
    assert [r["stage"] for r in timeless_records(whole) if r["event"] == "mytracker.stage_start"] == \
        ["phase1", "phase2", "test"]


class _SlowSteps:
    """Sleeps after each step of phase1 up to step 6, the checkpoint before the stop."""

    @stagewise.hookimpl
    def stagewise_after_step(self, state):
        if state.stage_name == "phase1" and state.step <= 6:
            time.sleep(0.1)


def test_a_resumed_stage_and_epoch_count_the_seconds_they_ran_before_the_stop(tiny, stopped_and_resumed):
    register_plugin(_SlowSteps(), "slowsteps")
    try:  # steps 1-6 slept 0.6 s before the checkpoint at step 6; the resumed part does not sleep
        stopped, _ = stopped_and_resumed(tiny("run.checkpoint_every_n_steps=3"), "phase1", 7)
    finally:
        unregister_plugin("slowsteps")
    assert read_summary(stopped)["stages"]["phase1"]["seconds"] >= 0.6  # was the resumed part's alone
    epoch_1 = next(r for r in read_records(stopped, "epoch") if r["stage"] == "phase1" and r["epoch"] == 1)
    assert epoch_1["seconds"] >= 0.1  # its step 6 slept before the checkpoint


@pytest.mark.parametrize("every, stage, step, where", [
    (3, "phase1", 7, "at stage 1/3, epoch 2 after step 6"),  # mid-epoch: last.pt is step 6, one into epoch 2
    (0, "phase1", 7, "at stage 1/3, start of epoch 2"),  # checkpoints at epoch ends only
    (0, "phase2", 1, "at stage 2/3")], ids=["mid-epoch", "epoch-start", "stage-start"])
def test_resume_says_where_in_the_stage_it_goes_on(tiny, tmp_path, capsys, every, stage, step, where):
    recipe = tiny(f"run.checkpoint_every_n_steps={every}")
    run_recipe(recipe, resume=_stop(recipe, tmp_path / "run", stage, step))
    assert f"resuming {tmp_path / 'run'} {where}\n" in capsys.readouterr().out  # was "at stage 1/3" alone


def test_resume_removes_the_temp_files_that_a_kill_during_a_write_left(tiny, tmp_path):
    # a SIGKILL inside atomic_write_bytes leaves its temp file (.last.pt.<random>.tmp) behind: they piled up,
    # a checkpoint's size each, with every kill and resume (lego-ashem's cache: hundreds of MB at a time)
    run = run_recipe(tiny(), out=tmp_path / "run", quiet=True)
    left = [run / "checkpoints" / ".last.pt.k2x9a1b3.tmp", run / ".summary.json.p0q8r7s6.tmp",
            run / "plots" / ".curves.png.abcdefgh.tmp"]
    for path in left:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"half")
    (run / "notes.tmp").write_text("the user's")  # not a temp file of an atomic write
    run_recipe(tiny(), resume=run, quiet=True)
    assert [path for path in left if path.exists()] == [] and (run / "notes.tmp").exists()


def test_a_run_killed_while_its_folder_is_made_runs_again_there_with_every_file(tiny, tmp_path, monkeypatch):
    """A kill (here: Ctrl-C) as RunDir.create writes its files. Was: killed before recipe.toml was in place,
    the folder (checkpoints/, a temp file) was neither a run to --resume nor empty for --out; killed after
    it, the resumed run never wrote env.json and vocab.txt (an export then had no vocabulary)."""
    from stagewise.engine import rundir

    def killed_at(name, write):
        def kill(path, data, **how):  # how: write_text_atomic's replace=
            if path.name == name:
                raise KeyboardInterrupt
            write(path, data, **how)
        return kill

    cut = tmp_path / "cut"
    monkeypatch.setattr(rundir, "write_text_atomic", killed_at("recipe.toml", rundir.write_text_atomic))
    with pytest.raises(KeyboardInterrupt):
        run_recipe(tiny(), out=cut, quiet=True)
    monkeypatch.undo()
    cut.mkdir(exist_ok=True)  # Ctrl-C inside that write leaves the folder it made, empty
    shutil.copytree(cut, tmp_path / "cut-2")
    (cut / ".recipe.toml.a1b2c3d4.tmp").write_text("[ru")  # what a SIGKILL in that write leaves
    shutil.copytree(cut, tmp_path / "cut-3")
    run_recipe(tiny(), out=cut, quiet=True)  # the folder holds nothing of a run: --out takes it
    for again in ("cut-2", "cut-3"):  # and --resume runs it from the start
        run_recipe(tiny(), resume=tmp_path / again, quiet=True)
        assert read_summary(tmp_path / again)["metrics"] == read_summary(cut)["metrics"]

    run = tmp_path / "run"
    monkeypatch.setattr(rundir, "write_json_atomic", killed_at("env.json", rundir.write_json_atomic))
    with pytest.raises(KeyboardInterrupt):
        run_recipe(tiny(), out=run, quiet=True)
    monkeypatch.undo()
    run_recipe(tiny(), resume=run, quiet=True)
    assert [(run / name).read_text() for name in ("env.json", "vocab.txt")] == \
        [(cut / name).read_text() for name in ("env.json", "vocab.txt")]
    assert read_summary(run)["metrics"] == read_summary(cut)["metrics"]


class _StopOther:
    """Stops the comparison's second run, ``other``, after its third step."""

    @stagewise.hookimpl
    def stagewise_after_step(self, state):
        if state.recipe.run.name == "other" and state.step == 3:
            raise _Stop


def test_a_stopped_comparison_goes_on_with_compare_resume(tiny_recipe_path, tmp_path):
    # was: a stopped `stagewise compare` could not go on: its finished run's folder was "not empty"
    from stagewise.cli.main import main
    from stagewise.compare import compare_recipes

    other = tmp_path / "other.toml"
    other.write_text(tiny_recipe_path.read_text().replace('name = "tiny"', 'name = "other"'))
    names, out = [str(tiny_recipe_path), str(other)], tmp_path / "cmp"
    register_plugin(_StopOther(), "resumetest")
    try:
        with pytest.raises(_Stop):
            compare_recipes(names, [], out, quiet=True)
    finally:
        unregister_plugin("resumetest")
    finished = (out / "tiny" / "metrics.jsonl").read_text()
    with pytest.raises(CheckpointError, match=f"tiny is not empty; pass --resume {out} to continue that comparison"):
        compare_recipes(names, [], out, quiet=True)
    with pytest.raises(CheckpointError, match=r"stages\.phase1\.lr = 0\.5 \(the run started with"):
        compare_recipes(names, ["stages.phase1.lr=0.5"], out, quiet=True, resume=True)  # before any run
    with pytest.raises(CheckpointError, match="no such folder; give the --out folder of the comparison"):
        compare_recipes(names, [], tmp_path / "cpm", quiet=True, resume=True)  # a typo starts nothing

    assert main(["compare", *names, "--resume", str(out), "--quiet"]) == 0
    whole = compare_recipes(names, [], tmp_path / "whole", quiet=True)
    resumed = json.loads((out / "compare.json").read_text())["runs"]
    assert {name: run["metrics"] for name, run in resumed.items()} == {name: run["metrics"]
                                                                       for name, run in whole.items()}
    assert (out / "tiny" / "metrics.jsonl").read_text() == finished  # the finished run trained no step again


class _CtrlCOther:
    """Ctrl-C in the comparison's second run, ``other``, after its third step."""

    @stagewise.hookimpl
    def stagewise_after_step(self, state):
        if state.recipe.run.name == "other" and state.step == 3:
            raise KeyboardInterrupt


def test_ctrl_c_in_a_comparison_prints_the_command_that_continues_it(tiny_recipe_path, tmp_path, capsys):
    import shlex

    from stagewise.cli.main import main
    from stagewise.compare import compare_recipes

    other = tmp_path / "other.toml"
    other.write_text(tiny_recipe_path.read_text().replace('name = "tiny"', 'name = "other"'))
    names, out, sets = [str(tiny_recipe_path), str(other)], tmp_path / "my cmp", ["stages.phase1.max_epochs=1"]
    register_plugin(_CtrlCOther(), "resumetest")
    try:
        assert main(["compare", *names, "--out", str(out), "--quiet", "--set", sets[0]]) == 130
    finally:
        unregister_plugin("resumetest")
    again = shlex.join(["stagewise", "compare", *names, "--resume", str(out), "--set", sets[0]])
    assert capsys.readouterr().err == f"stagewise: interrupted; continue with: {again}\n"  # was: interrupted
    assert main(shlex.split(again)[1:] + ["--quiet"]) == 0  # what it says, run
    whole = compare_recipes(names, sets, tmp_path / "whole", quiet=True)
    resumed = json.loads((out / "compare.json").read_text())["runs"]
    assert {name: run["metrics"] for name, run in resumed.items()} == {name: run["metrics"]
                                                                       for name, run in whole.items()}


def test_compare_resume_drops_the_temp_file_of_a_table_write_a_kill_cut_short(tiny_recipe_path, tmp_path):
    # was: a comparison killed as it wrote compare.json kept its temp file after --resume had written the table
    from stagewise.compare import compare_recipes

    out, sets = tmp_path / "cmp", ["stages.phase1.max_epochs=1", "stages.phase2.max_epochs=1"]
    compare_recipes([str(tiny_recipe_path)], sets, out, quiet=True)
    (out / ".compare.json.k1ll3d.tmp").write_text('{"runs": {"ti')  # as SIGKILL leaves it, before the rename
    (out / ".compare.png.k1ll3d.tmp").write_bytes(b"\x89PNG")  # or as compare.png was drawn
    compare_recipes([str(tiny_recipe_path)], sets, out, quiet=True, resume=True)
    figure = ["compare.png"] if have_matplotlib() else []  # drawn anew too
    assert sorted(path.name for path in out.iterdir()) == ["compare.json", *figure, "tiny"]


def test_run_stopped_says_so_when_the_run_was_not_stopped(tiny, tmp_path):
    short = tiny("stages.phase1.max_epochs=1", "stages.phase2.max_epochs=1")
    with pytest.raises(AssertionError, match="the run was to be stopped at step 99 of 'phase1' but finished"):
        run_stopped(short, tmp_path / "run", "phase1", 99)
    assert (tmp_path / "run" / "summary.json").is_file()


def test_a_data_file_changed_since_the_run_started_is_refused(tiny, tmp_path):
    # was: resumed, training the rest of the run on the edited file, unsaid
    data, text = tmp_path / "data", "the old man and the sea went out to the sea again\n" * 25
    data.mkdir()
    for split in ("train", "valid", "test"):
        (data / f"{split}.txt").write_text(text)
    recipe = (f"data.path={str(data)!r}", "data.max_tokens=1000")
    run = run_stopped(tiny(*recipe), tmp_path / "run", "phase2", 2)
    records = (run / "metrics.jsonl").read_bytes()
    (data / "train.txt").write_text(text + "the old man\n")
    with pytest.raises(CheckpointError) as info:
        run_recipe(tiny(*recipe), resume=run, quiet=True)
    assert str(info.value) == (
        f"--resume {run}: the data is not what the run started with (tokens {{'train': 325, 'valid': 325, "
        f"'test': 325}} then, {{'train': 329, 'valid': 325, 'test': 325}} now; its vocab.txt differs from the run's): "
        f"a data file has changed since; restore it to continue the run, or run the recipe again with --out and a "
        f"new folder")
    (data / "train.txt").write_text(text.replace("went", "sea"))  # was: "a damaged checkpoint", as the weights'
    with pytest.raises(CheckpointError, match=r"\(vocab_size 11 then, 10 now; its vocab\.txt differs from the "
                                              r"run's\): a data file has changed since"):  # shapes no longer fit
        run_recipe(tiny(*recipe), resume=run, quiet=True)
    swapped = text.replace("sea", "X").replace("old", "sea").replace("X", "old")  # same words and sizes, other ids
    (data / "train.txt").write_text(swapped)
    with pytest.raises(CheckpointError, match=r"\(its vocab\.txt differs from the run's\): a data file has changed"):
        run_recipe(tiny(*recipe), resume=run, quiet=True)
    assert (run / "metrics.jsonl").read_bytes() == records
    (data / "train.txt").write_text(text)
    resumed = run_recipe(tiny(*recipe), resume=run, quiet=True)
    whole = run_recipe(tiny(*recipe), out=tmp_path / "whole", quiet=True)
    assert timeless_records(resumed) == timeless_records(whole)


def test_a_checkpoint_that_is_not_there_is_named(tmp_path):
    with pytest.raises(stagewise.CheckpointError, match=f"^{tmp_path / 'nope.pt'}: checkpoint not found$"):
        load_checkpoint(tmp_path / "nope.pt")
