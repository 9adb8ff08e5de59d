"""The benchmark scripts' shared bookkeeping: their runs survive a failure, a used folder is refused."""

from __future__ import annotations

import argparse
import json
import re

import pytest
from conftest import read_summary

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


def test_a_failed_run_says_why_and_runs_that_had_not_started_never_start(tiny, tmp_path):
    missing = tmp_path / "missing.txt"
    runs = {"bad": (tiny(f"data.path={missing}"), tmp_path / "bad"), "good": (tiny(), tmp_path / "good"),
            "later": (tiny(), tmp_path / "later")}
    with pytest.raises(stagewise.StagewiseError, match=f"{re.escape(str(missing))} does not exist"):
        run_recipes(runs, jobs=2)
    assert read_summary(tmp_path / "good")["metrics"]  # it was running: it finished
    assert not (tmp_path / "later").exists()


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_jobs_must_be_a_whole_number_of_at_least_one(value, capsys):
    parser = argparse.ArgumentParser(prog="bench")
    add_jobs_option(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--jobs", value])
    assert f"argument --jobs: must be a whole number >= 1, got {value!r}" in capsys.readouterr().err
    assert parser.parse_args(["--jobs", "3"]).jobs == 3 and parser.parse_args([]).jobs == default_jobs()
