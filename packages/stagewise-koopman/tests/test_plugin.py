"""Registration through stagewise's public registry, a light plugin module, valid recipes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import stagewise
from stagewise.recipe import load_recipe
from stagewise.verify import verify_run

GOLDEN = Path(__file__).parent / "golden"  # a change there is a behaviour change: make it deliberately, say why


def test_components_are_registered():
    assert stagewise.get_loss("koopman.operator").name == "koopman.operator"
    assert {"koopman.forward_eval", "koopman.linearity"} <= set(stagewise.get_stages())
    assert {"koopman.hybrid", "koopman.baseline"} <= set(stagewise.get_recipes())


def test_listing_plugins_imports_no_torch():
    code = ("import sys; from stagewise.cli.main import main; main(['plugins']); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "koopman.operator" in result.stdout


def test_shipped_recipes_validate_and_compare_like_for_like():
    hybrid, baseline = load_recipe("koopman.hybrid"), load_recipe("koopman.baseline")
    assert [s.name for s in hybrid.stages] == ["warmup", "main", "forward", "linearity", "test"]
    assert hybrid.table["data"] == baseline.table["data"] and hybrid.run.seed == baseline.run.seed
    assert hybrid.table["model"] == baseline.table["model"]
    # same stages and epochs; only the Koopman term (and its forward-mode report) differs
    main_h, main_b = hybrid.table["stages"][1], baseline.table["stages"][1]
    assert {k: v for k, v in main_h.items() if k != "losses"} == {k: v for k, v in main_b.items() if k != "losses"}
    assert [term["use"] for term in main_h["losses"]] == ["stagewise.cross_entropy", "koopman.operator"]


def test_compare_runs_baseline_and_hybrid_in_one_process_and_prints_one_table(tmp_path, capsys):
    """``stagewise compare koopman.baseline koopman.hybrid``, shrunk to tiny sizes by --set."""
    from stagewise.compare import compare_recipes

    tiny = ["data.max_tokens=400", "data.seq_len=8", "data.batch_size=4", "model.n_embd=16", "model.n_head=2",
            "model.ffn_hidden=32", "stages.warmup.max_epochs=1", "stages.main.max_epochs=2",
            "stages.warmup.max_steps_per_epoch=2", "stages.main.max_steps_per_epoch=2", "stages.linearity.fit_steps=2"]
    runs = compare_recipes(["koopman.baseline", "koopman.hybrid"], tiny, tmp_path, quiet=True)
    assert list(runs) == ["koopman_baseline", "koopman_hybrid"]
    summaries = {name: json.loads((Path(run["run_dir"]) / "summary.json").read_text(encoding="utf-8"))
                 for name, run in runs.items()}
    # same data and seed: the LM-only warmup is the same run in both
    warmup = [s["stages"]["warmup"]["metrics"] for s in summaries.values()]
    assert warmup[0] == warmup[1] and len({s["seed"] for s in summaries.values()}) == 1
    hybrid = runs["koopman_hybrid"]["metrics"]
    assert "train/koopman" not in runs["koopman_baseline"]["metrics"] and "forward/koopman_ppl" in hybrid
    table = capsys.readouterr().out.split("\n\n-> ")[0].splitlines()
    assert table[0].split() == ["metric", "koopman_baseline", "koopman_hybrid", "koopman_hybrid", "vs",
                                "koopman_baseline"]
    assert sum(line.split()[0] == "val/ppl" for line in table) == 1  # one row per metric, both runs in it
    for name, run in runs.items():  # the shipped recipes' numbers, pinned as the tiny hybrid's are
        assert verify_run(Path(run["run_dir"]), GOLDEN / f"{name}_small.json") == [], name
