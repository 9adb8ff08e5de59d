"""The benchmark scripts' shared bookkeeping: their runs survive a failure, a used folder is refused."""

from __future__ import annotations

import json

import stagewise
from stagewise.bench import run_benchmark


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
