"""The benchmark scripts' shared bookkeeping: their runs survive a failure, a used folder is refused."""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time

import pytest
from conftest import read_records, read_summary

import stagewise
from stagewise.bench import add_jobs_option, default_jobs, run_benchmark, run_recipes


def test_a_result_is_printed_as_a_table_and_one_json_line(tmp_path, capsys):
    def measure(out):
        return {"ppl": 1.5, "out": out.name}

    written = tmp_path / "results" / "r.json"  # its folder is made: it failed after minutes of measuring
    code = run_benchmark("bench", measure, lambda r: f"ppl {r['ppl']}", tmp_path / "out", "x", written)
    assert code == 0
    assert capsys.readouterr().out.splitlines() == ["ppl 1.5", '{"ppl": 1.5, "out": "out"}']
    assert json.loads(written.read_text()) == {"ppl": 1.5, "out": "out"}


def test_finished_runs_survive_a_later_failure(tmp_path, capsys):
    def measure(out):
        (out / "baseline").mkdir(parents=True)
        (out / "baseline" / "summary.json").write_text("{}")  # one run finished ...
        raise stagewise.TrainingError("the next one failed")  # ... then one failed

    out = tmp_path / "out"
    assert run_benchmark("bench", measure, str, out, "x") == 1
    err = capsys.readouterr().err
    assert err.startswith("bench: the next one failed") and f"are in {out}" in err and "Traceback" not in err
    assert (out / "baseline" / "summary.json").read_text() == "{}"
    assert run_benchmark("bench", measure, str, out, "x") == 1  # a used folder is refused ...
    assert "is not empty; pass --out with a new folder" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["baseline"]  # ... before measure runs


def test_ctrl_c_is_a_message_and_exit_130_not_a_traceback(tmp_path, capsys):
    def measure(out):
        raise KeyboardInterrupt

    assert run_benchmark("bench", measure, str, tmp_path / "out", "x") == 130
    assert capsys.readouterr().err == f"bench: interrupted\n(finished runs, if any, are in {tmp_path / 'out'})\n"


def test_the_default_folder_is_never_reused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    used = []

    def measure(out):
        used.append(out)
        (out / "run").mkdir(parents=True)
        return {}

    for _ in range(2):
        assert run_benchmark("bench", measure, str, None, "bench-x") == 0
    assert [str(p) for p in used] == ["runs/bench-x", "runs/bench-x-2"]


def test_runs_side_by_side_give_the_numbers_they_give_one_after_another(tiny, tmp_path):
    runs = {name: tiny(f"run.seed={seed}") for name, seed in (("a", 7), ("b", 8))}
    alone = run_recipes({name: (recipe, tmp_path / "alone" / name) for name, recipe in runs.items()}, jobs=1)
    both = run_recipes({name: (recipe, tmp_path / "both" / name) for name, recipe in runs.items()}, jobs=2)
    assert list(both) == ["a", "b"] and all(both[name].path == tmp_path / "both" / name for name in runs)
    assert all(run.seconds > 0 for run in both.values())
    metrics = {name: read_summary(run.path)["metrics"] for name, run in both.items()}
    assert metrics == {name: read_summary(run.path)["metrics"] for name, run in alone.items()}  # bit for bit
    assert metrics["a"] != metrics["b"]  # two runs, not one twice


LONG = "stages.phase1.max_epochs=2000"  # a minute or more of tiny epochs: stopped long before its end


def _training(run_dir):
    """Whether the run has logged an epoch (its last line may be half written)."""
    metrics = run_dir / "metrics.jsonl"
    return metrics.exists() and '"event": "epoch"' in metrics.read_text(errors="replace")


def _stopped_at_a_checkpoint(run_dir):
    """A run SIGTERM stopped: trained, checkpointed, never finished."""
    return (any(r["event"] == "epoch" for r in read_records(run_dir)) and any((run_dir / "checkpoints").iterdir())
            and not (run_dir / "summary.json").exists())


def test_a_failed_run_stops_the_runs_going_and_starts_no_more(tiny, tmp_path):
    # "bad" trains phase 1 for some seconds, then diverges in phase 2: by then "long", started with it, is training
    bad = tiny("stages.phase1.max_epochs=60", "stages.phase2.lr=1e30", "stages.phase2.grad_clip=1e30",
               "stages.phase2.max_nonfinite=1")
    runs = {"long": (tiny(LONG), tmp_path / "long"), "bad": (bad, tmp_path / "bad"),
            "later": (tiny(), tmp_path / "later")}
    with pytest.raises(stagewise.StagewiseError, match=r"^1 non-finite losses in a row at stage 'phase2'"):
        run_recipes(runs, jobs=2)
    assert _stopped_at_a_checkpoint(tmp_path / "long")  # as SIGTERM stops a run: resumable
    assert not (tmp_path / "later").exists()


def test_sigterm_to_the_benchmark_stops_its_runs_and_exits_143(tiny, tmp_path):
    runs = {name: (tiny(LONG), tmp_path / name) for name in ("a", "b")}
    handler = signal.getsignal(signal.SIGTERM)

    def terminate_once_both_train():
        deadline = time.monotonic() + 120  # were they never to train, the test fails instead of waiting them out
        while not all(_training(tmp_path / name) for name in runs) and time.monotonic() < deadline:
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=terminate_once_both_train, daemon=True).start()
    with pytest.raises(SystemExit) as stopped:
        run_recipes(runs, jobs=2)
    assert stopped.value.code == 143
    assert all(_stopped_at_a_checkpoint(tmp_path / name) for name in runs)  # not orphaned, training on
    assert signal.getsignal(signal.SIGTERM) is handler  # put back


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_jobs_must_be_a_whole_number_of_at_least_one(value, capsys):
    parser = argparse.ArgumentParser(prog="bench")
    add_jobs_option(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--jobs", value])
    assert f"argument --jobs: must be a whole number >= 1, got {value!r}" in capsys.readouterr().err
    assert parser.parse_args(["--jobs", "3"]).jobs == 3 and parser.parse_args([]).jobs == default_jobs()
