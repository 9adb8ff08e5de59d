"""The benchmark script's bookkeeping, on the tiny recipe: no benchmark-sized run here."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from conftest import TRAIN_ONLY

BENCH = Path(__file__).parents[1] / "bench" / "hybrid_vs_baseline.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("hybrid_vs_baseline", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fallbacks_are_counted_over_the_whole_main_stage(bench, tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(TRAIN_ONLY.replace("fallback_threshold = 3.1", "fallback_threshold = 0.0"))
    summary = bench.run(str(recipe), [], tmp_path / "run")
    # every batch of epochs 1 and 2 (3 steps each) is cut, whichever epoch restore_best keeps
    assert bench.stage_fallbacks(summary) == 6
    assert [e["train/koopman/fallbacks"] for e in summary["main_epochs"]] == [0, 3, 6]


def test_bad_data_is_a_message_not_a_traceback(bench, tmp_path, capsys):
    assert bench.main(["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "out"), "--quick"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("hybrid_vs_baseline: ") and "missing does not exist" in err
    assert "Traceback" not in err



def test_pair_row_gain_is_the_baseline_error_over_the_hybrid_error(bench):
    base = {"val/ppl": 100.0, "test/ppl": 110.0, "linearity/one_step_error": 0.3}
    hybrid = {"val/ppl": 101.0, "test/ppl": 107.8, "linearity/one_step_error": 0.1}
    row = bench.pair_row(2, base, hybrid)
    assert row["linearity_gain"] == pytest.approx(3.0)  # the hybrid is three times as linear
    assert row["ppl_change_pct"] == pytest.approx(1.0) and row["test_ppl_change_pct"] == pytest.approx(-2.0)
    assert (row["seed"], row["baseline_ppl"], row["hybrid_ppl"]) == (2, 100.0, 101.0)
