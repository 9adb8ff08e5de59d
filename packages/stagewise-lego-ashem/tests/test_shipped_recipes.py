"""The shipped recipes and the benchmark's contract, run small: the side-by-side comparison,
every JSON key of ``bench/ashem_vs_baseline.py`` under the same name in the recipe's
summary.json, and ``lego_ashem.seed_protocol``'s mining on the validation split."""

from __future__ import annotations

import json
import random
import tomllib
from pathlib import Path

import torch
from conftest import read_summary

from stagewise.compare import compare_recipes, comparison_table
from stagewise.engine.checkpoint import load_checkpoint
from stagewise.engine.runner import run_recipe
from stagewise.recipe import load_recipe
from stagewise.verify import verify_run

# the shipped models at width 16 on 3000 tokens of the built-in corpus, one epoch per training stage
SMALL = ["data.max_tokens=3000", "model.n_embd=16", "model.ffn_hidden=32", "run.threads=1"]
GOLDEN = Path(__file__).parent / "golden"


def _matches_golden(run_dir: Path, name: str) -> list[str]:
    """Differences from the golden record ``name``, exact (wall-clock measurements are not in it).
    A change here is a behaviour change: make it deliberately, say why."""
    return verify_run(run_dir, GOLDEN / f"{name}.json")


def test_compare_runs_ashem_and_baseline_side_by_side_in_one_table(tmp_path, capsys):
    runs = compare_recipes(["lego_ashem.baseline", "lego_ashem.ashem"],
                           [*SMALL, "stages.train.max_epochs=1", "stages.phase1.max_epochs=1",
                            "stages.phase2.max_epochs=1", "stages.phase2.measure_speed=false"],
                           tmp_path / "compare", quiet=True)
    assert list(runs) == ["baseline", "ashem"]
    assert comparison_table(runs) in capsys.readouterr().out and (tmp_path / "compare" / "compare.json").is_file()
    assert _matches_golden(tmp_path / "compare" / "baseline", "baseline_small") == []
    header, *rows = comparison_table(runs).splitlines()
    assert header.split() == ["metric", "baseline", "ashem", "ashem", "vs", "baseline"]
    # the baseline's full-depth test/ppl on the same row as ASHEM's routed one
    ppl = next(row.split() for row in rows if row.split()[0] == "test/ppl")
    assert ppl[1:3] == [f"{runs[n]['metrics']['test/ppl']:.6g}" for n in ("baseline", "ashem")]


def _write_text_dir(folder: Path) -> Path:
    """train/valid/test.txt, WikiText-style lines of words from a small seeded vocabulary."""
    rng, words = random.Random(0), [f"w{i}" for i in range(60)]
    folder.mkdir()
    for split, lines in (("train", 200), ("valid", 40), ("test", 40)):
        text = "\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(lines))
        (folder / f"{split}.txt").write_text(text + "\n", encoding="utf-8")
    return folder


def _recipe_file(run_dir: Path) -> dict:
    return tomllib.loads((run_dir / "recipe.toml").read_text(encoding="utf-8"))


def test_the_benchmark_json_holds_every_contract_key_named_as_in_the_recipes_summary(bench, tmp_path,
                                                                                       monkeypatch):
    # the speed-only shape (dim 256, 8 layers) is no part of the contract: left out here
    monkeypatch.setattr(bench, "large_shape_speed", lambda: {f"large_{m}_{k}": 1.0 for m in ("max_prob", "probe")
                        for k in ("compute_cost_flops", "speedup_measured", "shallow_ratio")})
    out = tmp_path / "out.json"
    args = ["--data", str(_write_text_dir(tmp_path / "data")), "--out", str(tmp_path / "runs"), "--json", str(out)]
    # a --set on a stage only the ashem recipe has goes to it alone, as in `stagewise compare`
    assert bench.main([*args, "--quick", "--set", "stages.phase2.max_epochs=1"]) == 0
    result = json.loads(out.read_text())
    assert set(bench.CONTRACT) <= set(result)
    assert result["overrides"] == ["stages.phase2.max_epochs=1"]
    phase2 = next(s for s in _recipe_file(tmp_path / "runs" / "ashem")["stages"] if s["name"] == "phase2")
    assert phase2["max_epochs"] == 1 and "phase2" not in read_summary(tmp_path / "runs" / "baseline")["stages"]
    baseline, ashem = (read_summary(tmp_path / "runs" / name)["metrics"] for name in ("baseline", "ashem"))
    assert result["baseline_ppl"] == baseline["test/ppl"]  # the baseline recipe's name for it
    for key in set(bench.CONTRACT) - {"baseline_ppl"}:  # the ashem recipe's: <stage>/<key>
        (name,) = [k for k in ashem if k.rsplit("/", 1)[-1] == key and k.split("/")[0] in ("test", "phase2")]
        assert result[key] == ashem[name], key


def test_seed_protocol_mines_and_reports_on_the_validation_split_and_trains_the_head(tmp_path, capsys):
    recipe = load_recipe("lego_ashem.seed_protocol",
                         [*SMALL, "stages.phase1.max_epochs=1", "stages.phase2.max_epochs=1",
                          "stages.phase2.measure_speed=false", "stages.valid.measure_speed=false",
                          "stages.valid.curve_points=2"])
    run_dir = run_recipe(recipe, out=tmp_path / "run", quiet=True)
    mine = load_checkpoint(run_dir / "checkpoints" / "mine.pt")
    assert mine["artifacts"]["lego_ashem.cache"]["split"] == "valid"
    assert mine["artifacts"]["lego_ashem.router"]["calib_split"] == "valid"
    metrics = read_summary(run_dir)["metrics"]
    assert _matches_golden(run_dir, "seed_protocol_small") == []
    assert metrics["mine/tokens"] == mine["artifacts"]["lego_ashem.cache"]["hard"].numel()
    assert metrics["mine/calib_hard_ratio"] == metrics["mine/hard_ratio"]  # the same split calibrated and mined
    assert "valid/routed_ppl" in metrics and metrics["warnings/not_held_out"] == 1
    assert "stage 'valid' reports on split 'valid'" in capsys.readouterr().err
    assert "val/mined_hard_ppl" in metrics  # context = "token", the seed's length-1 sequences
    after = load_checkpoint(run_dir / "checkpoints" / "phase2.pt")["model"]
    for name, tensor in mine["model"].items():  # the seed leaves the head (and final norm) trainable
        assert torch.equal(after[name], tensor) != name.startswith(("head.", "norm.")), name
