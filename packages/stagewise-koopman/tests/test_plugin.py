"""Registration through stagewise's public registry, a light plugin module, valid recipes."""

from __future__ import annotations

import subprocess
import sys

import stagewise
from stagewise.recipe import load_recipe


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
