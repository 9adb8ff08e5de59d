"""SIGTERM (a cluster's preemption) stops a run at its next checkpoint, which it writes there, and says how
to resume it; resumed, the run ends with the numbers of an uninterrupted one."""

from __future__ import annotations

import os
import shlex
import signal
import threading

import pytest
import torch
from conftest import TINY, read_summary

import stagewise
from stagewise.cli.main import main
from stagewise.engine import signals
from stagewise.engine.checkpoint import load_checkpoint
from stagewise.engine.runner import run_recipe
from stagewise.errors import RunStopped
from stagewise.plugins import register_plugin, unregister_plugin
from stagewise.testing import resume_run, run_terminated, run_uninterrupted, timeless_records

posix = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="Windows: os.kill(SIGTERM) ends a process at once")
ACCUMULATE = ["stages.phase1.accumulate_batches=2", "stages.phase2.accumulate_batches=2"]


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("recipe") / "tiny.toml"
    path.write_text(TINY)
    return path


@pytest.fixture(scope="module")
def whole(recipe_file, tmp_path_factory):
    """An uninterrupted child run of the tiny recipe for each set of overrides, made once."""
    made = {}

    def run(sets: tuple[str, ...]):
        if sets not in made:
            made[sets] = tmp_path_factory.mktemp("whole") / "run"
            run_uninterrupted(recipe_file, made[sets], sets)
        return made[sets]
    return run


def _model(run_dir) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]


@posix
@pytest.mark.parametrize("stage, step, sets", [("phase1", 7, ()), ("phase2", 4, ()), ("phase1", 3, tuple(ACCUMULATE))],
                         ids=["phase1", "phase2", "accumulating"])
def test_a_run_sent_sigterm_mid_stage_resumes_to_the_uninterrupted_numbers(recipe_file, whole, tmp_path, stage, step,
                                                                           sets):
    # was: the process died at once (exit -15, nothing said), losing every step since the epoch's checkpoint
    stopped = tmp_path / "stopped"
    stderr = run_terminated(recipe_file, stopped, stage, step, sets)
    again = shlex.join(["stagewise", "run", str(recipe_file), "--resume", str(stopped), *(a for s in sets
                                                                                          for a in ("--set", s))])
    assert f"stagewise: stopped by SIGTERM after step {step} of stage {stage!r}, checkpointed there; continue with: " \
           f"{again}\n" in stderr
    saved = load_checkpoint(stopped / "checkpoints" / "last.pt")
    assert (saved["stage_name"], saved["stage_done"], saved["step"]) == (stage, False, step)  # no step lost
    assert not (stopped / "summary.json").exists()

    resume_run(recipe_file, stopped, sets)
    reference = whole(sets)
    assert read_summary(stopped)["metrics"] == read_summary(reference)["metrics"]
    assert timeless_records(stopped) == timeless_records(reference)
    assert all(torch.equal(tensor, _model(reference)[name]) for name, tensor in _model(stopped).items())


class _Signaller:
    """Sends this process SIGTERM at the hook points ``at`` names: (event, stage, step) -> how many times."""

    def __init__(self, at: dict[tuple[str, str, int], int]) -> None:
        self.at = at
        self.handler_in_run = None  # SIGTERM's handler as the run saw it

    def _send(self, event: str, state) -> None:
        self.handler_in_run = signal.getsignal(signal.SIGTERM)
        for _ in range(self.at.get((event, state.stage_name, state.step), 0)):
            os.kill(os.getpid(), signal.SIGTERM)

    @stagewise.hookimpl
    def stagewise_before_step(self, state):
        self._send("before_step", state)

    @stagewise.hookimpl
    def stagewise_after_step(self, state):
        self._send("after_step", state)

    @stagewise.hookimpl
    def stagewise_before_stage(self, state):
        self._send("before_stage", state)


@pytest.fixture
def signalled():
    """``signalled(at)``: a :class:`_Signaller` registered for the test."""
    made = []

    def register(at):
        made.append(_Signaller(at))
        register_plugin(made[-1], "signaller")
        return made[-1]
    yield register
    if made:
        unregister_plugin("signaller")


def _stopped(recipe, out) -> RunStopped:
    with pytest.raises(RunStopped) as stopped:
        run_recipe(recipe, out=out, quiet=True)
    assert stopped.value.run_dir == out
    return stopped.value


@posix
@pytest.mark.parametrize("at, times, where, loop", [
    # the epoch's last step: its evaluation follows, then the epoch's checkpoint (there is no mid-epoch one after it)
    (("after_step", "phase1", 5), 1, "after step 5 of stage 'phase1', the end of epoch 1", (1, 0)),
    # the stage's last step: the stage's checkpoint; a signal in a stage that is no training stage stops there too
    (("after_step", "phase1", 10), 1, "after stage 'phase1' ended", None),
    # twice at once (SLURM signals each process of a job, and torchrun's agent passes it on): one request
    (("after_step", "phase2", 2), 2, "after step 2 of stage 'phase2'", (0, 2)),
], ids=["epoch-end", "stage-end", "twice-at-once"])
def test_a_signal_stops_the_run_at_its_next_checkpoint(tiny, tmp_path, signalled, at, times, where, loop):
    signalled({at: times})
    stopped = _stopped(tiny(), tmp_path / "run")
    assert (stopped.signal, stopped.where) == ("SIGTERM", where)
    saved = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert (saved["stage_name"], saved["stage_done"]) == (at[1], loop is None)
    if loop is not None:
        assert (saved["loop"]["epoch"], saved["loop"]["batch"]) == loop


@posix
def test_a_second_signal_stops_the_run_at_once(tiny, tmp_path, signalled, monkeypatch):
    monkeypatch.setattr(signals, "REPEAT_S", 0.0)  # later than the time a signal repeats in, as a person's second kill
    signalled({("before_step", "phase1", 6): 1, ("after_step", "phase1", 7): 1})  # step 6 is step 7's first
    stopped = _stopped(tiny(), tmp_path / "run")
    assert (str(stopped), stopped.where) == ("stopped at once by a second SIGTERM; it goes on from its last "
                                             "checkpoint", None)
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 5  # the epoch's, before it


@posix
def test_a_signal_in_the_last_stage_lets_the_run_finish(tiny, tmp_path, signalled):
    signalled({("before_stage", "test", 0): 1})  # nothing after the stage to resume: its summary is written
    run_recipe(tiny(), out=tmp_path / "run", quiet=True)
    assert "test/loss" in read_summary(tmp_path / "run")["metrics"]


@posix
def test_the_handler_is_the_runs_only(tiny, tmp_path, signalled):
    def mine(signum, frame):
        raise AssertionError("the run's SIGTERM came to the handler of the code that called it")

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        signaller = signalled({("after_step", "phase1", 7): 1})
        _stopped(tiny(), tmp_path / "stopped")  # the run stopped, on its own handler
        assert signal.getsignal(signal.SIGTERM) is mine  # given back after a stop ...
        assert signaller.handler_in_run not in (mine, signal.SIG_DFL)
        signaller.at = {}
        run_recipe(tiny(), out=tmp_path / "whole", quiet=True)
        assert signal.getsignal(signal.SIGTERM) is mine  # ... and after a run that finished
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_run_in_another_thread_leaves_the_signal_handlers_alone(tiny, tmp_path, signalled):
    # Python calls signal handlers in the main thread only, and signal.signal refuses other threads
    signaller = signalled({})
    failed = []

    def run():
        try:
            run_recipe(tiny("stages.phase1.max_epochs=1", "stages.phase2.max_epochs=1"), out=tmp_path / "run",
                       quiet=True)
        except BaseException as exc:  # reported below, in the test's thread
            failed.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert failed == []
    assert signaller.handler_in_run is signal.getsignal(signal.SIGTERM)


@posix
def test_the_cli_exits_143_with_the_command_that_continues_a_comparison(tiny_recipe_path, tmp_path, signalled,
                                                                        capsys):
    signalled({("after_step", "phase2", 3): 1})
    out = tmp_path / "cmp"
    assert main(["compare", str(tiny_recipe_path), "--out", str(out), "--quiet"]) == 143  # 128 + SIGTERM
    again = f"stagewise compare {tiny_recipe_path} --resume {out}"
    assert capsys.readouterr().err == f"stagewise: stopped by SIGTERM after step 3 of stage 'phase2', checkpointed " \
                                      f"there; continue with: {again}\n"


@posix
def test_a_signal_in_a_runs_last_stage_stops_a_comparison_before_its_next_run(tmp_path, signalled, capsys):
    # was: the request went with the run, which finished its last stage, and the comparison ran the next run to its
    # end, where a preemption's SIGKILL would cut it short: no resume command said, no status 143 for the job script
    recipes = [tmp_path / "a.toml", tmp_path / "b.toml"]
    recipes[0].write_text(TINY)
    recipes[1].write_text(TINY.replace('name = "tiny"', 'name = "other"'))
    signalled({("before_stage", "test", 0): 1})  # each run's last stage: only the first's is to be reached
    out, sets = tmp_path / "cmp", ["--set", "stages.phase1.max_epochs=1", "--set", "stages.phase2.max_epochs=1"]
    assert main(["compare", *map(str, recipes), "--out", str(out), "--quiet", *sets]) == 143
    again = shlex.join(["stagewise", "compare", *map(str, recipes), "--resume", str(out), *sets])
    assert capsys.readouterr().err == (f"stagewise: stopped by SIGTERM after run 'tiny' ended, checkpointed there; "
                                       f"continue with: {again}\n")
    assert "test/loss" in read_summary(out / "tiny")["metrics"]
    assert not (out / "other").exists()  # not started
    # resumed, the signal in the last run's last stage lets the comparison finish: nothing is left to run after it
    assert main(["compare", *map(str, recipes), "--resume", str(out), "--quiet", *sets]) == 0
    assert read_summary(out / "other")["metrics"] == read_summary(out / "tiny")["metrics"]


def test_votes_ride_on_the_example_counts_exactly():
    # under torchrun the processes' votes to stop share a sum with their example counts, which stay as they were
    assert signals.votes_and_count(2 * signals.VOTE + 8.0) == (2, 8.0)
    assert signals.votes_and_count(8.0) == (0, 8.0)
    assert signals.vote() == 0.0  # no run asked to stop
