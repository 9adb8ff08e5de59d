"""The benchmark script's bookkeeping, on the tiny recipe: no benchmark-sized run here."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
from conftest import TRAIN_ONLY

from stagewise.recipe import load_recipe

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
    summary = bench.run_all({"run": (load_recipe(recipe), tmp_path / "run")}, jobs=1)["run"]
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


CONTRACT = {"baseline_ppl", "hybrid_ppl", "koopman_forward_ppl", "koopman_forward_layers", "koopman_share",
            "linearity_gain", "fallbacks", "time_ratio", "sweep"}  # issue 4's OUT.json


def test_the_json_holds_every_key_of_the_contract(bench, tmp_path, monkeypatch):
    """main --data --json on the shipped recipes, shrunk to tiny sizes: the metric names it reads exist."""
    words = "the old man said that a dog ran to her house and we saw it in the rain".split()
    data = tmp_path / "data"
    data.mkdir()
    for i, split in enumerate(("train", "valid", "test")):
        text = " ".join(words[(7 * j + i) % len(words)] for j in range(500))
        (data / f"{split}.txt").write_text(text + "\n", encoding="utf-8")
    tiny = ["data.max_tokens=400", "data.seq_len=8", "data.batch_size=4", "model.n_embd=16", "model.n_head=2",
            "model.ffn_hidden=32", "stages.warmup.max_epochs=1", "stages.main.max_epochs=2",
            "stages.warmup.max_steps_per_epoch=2", "stages.main.max_steps_per_epoch=2", "stages.linearity.fit_steps=2"]
    monkeypatch.setitem(bench.SETTINGS, "quick", tiny)
    monkeypatch.setattr(bench, "CAPS", (0.05, bench.HYBRID_CAP))
    out = tmp_path / "out.json"
    assert bench.main(["--data", str(data), "--out", str(tmp_path / "runs"), "--json", str(out), "--quick"]) == 0
    result = json.loads(out.read_text(encoding="utf-8"))
    assert CONTRACT <= set(result)
    assert [set(point) for point in result["sweep"]] == [{"cap", "ppl", "linearity_gain"}] * 2
    assert [point["cap"] for point in result["sweep"]] == [0.05, bench.HYBRID_CAP]
    assert result["koopman_forward_layers"] == 2 and isinstance(result["fallbacks"], int)
    numbers = [result[key] for key in CONTRACT - {"sweep"}] + [v for p in result["sweep"] for v in p.values()]
    assert all(math.isfinite(v) and v >= 0 for v in numbers)


def test_set_goes_to_the_recipes_that_have_its_term(bench, tmp_path, capsys):
    extra = ["model.n_embd=32", "stages.main.losses.koopman.lifted_weight=5"]
    overrides = bench.recipe_overrides(tmp_path, "quick", extra)
    assert overrides["koopman.baseline"][-1] == "model.n_embd=32"  # no Koopman term there
    assert overrides["koopman.hybrid"][-2:] == extra
    assert "applies to koopman.hybrid only" in capsys.readouterr().out  # said once, as compare says it
    assert bench.at_seed(overrides["koopman.hybrid"], 3)[-1] == "run.seed=3"


@pytest.mark.parametrize("item", ["run.seed=7", "stages.main.losses.koopman.cap = 0.1",
                                  "~stages.main.losses.koopman.weight"])
def test_a_set_of_what_the_script_sets_itself_is_refused(bench, tmp_path, item):
    # it was overridden by the script, yet listed under "overrides": a seed-0 result read as seed 7's
    with pytest.raises(bench.StagewiseError, match=r"the benchmark sets run\.seed, .* itself .*; leave them out"):
        bench.recipe_overrides(tmp_path, "quick", ["model.n_embd=32", item])


def test_a_set_the_hybrid_refuses_stops_the_benchmark_before_its_first_run(bench, tmp_path, monkeypatch, capsys):
    # was: the baseline ran to its end (minutes; an hour in full mode) before the hybrid's recipe refused the key
    def run_recipes(runs, jobs):
        raise AssertionError(f"{', '.join(runs)} ran")

    monkeypatch.setattr(bench, "run_recipes", run_recipes)
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "valid", "test"):
        (data / f"{split}.txt").write_text("the old man said\n", encoding="utf-8")
    typo = "stages.main.losses.koopman.lifted_wieght=5"  # only the hybrid has the term: it goes there alone
    assert bench.main(["--data", str(data), "--out", str(tmp_path / "runs"), "--quick", "--set", typo]) == 1
    err = capsys.readouterr().err
    assert err.startswith("hybrid_vs_baseline: ") and f"lifted_wieght (from --set {typo}): unknown key" in err
