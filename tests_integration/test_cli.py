"""The ``stagewise`` command end to end, as a user runs it: recipes, run, verify, export, compare."""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest

from stagewise.engine.checkpoint import load_checkpoint
from stagewise.recipe import load_recipe
from stagewise.verify import verify_run

# Some final metrics of the EXAMPLE run (conftest.py); after a deliberate behaviour change, copy
# the same keys from its summary.json, saying in the commit which numbers moved and why.
GOLDEN = Path(__file__).parent / "golden" / "example.json"

BAD_RECIPE = """
[run]
seeed = 1                   # unknown key

[data]
batch_size = "big"          # wrong type

[model]
use = "stagewise.transformer"

[[stages]]
name = "phase1"
use = "stagewise.trian"     # unknown stage
"""


def records(run_dir: Path, event: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def test_recipes_lists_core_and_plugin_recipes(cli):
    lines = cli("recipes").stdout.splitlines()
    assert any(line.split() == ["stagewise.demo", "stagewise"] for line in lines)
    assert any(line.split() == ["example.hard_examples", "stagewise-example-plugin"] for line in lines)


def test_run_writes_the_run_directory(example_run, recipes):
    assert {"checkpoints", "env.json", "metrics.jsonl", "recipe.toml", "summary.json"} <= \
        {p.name for p in example_run.iterdir()}  # plots/ too, where matplotlib is installed
    assert sorted(p.name for p in (example_run / "checkpoints").iterdir()) == \
        ["hard.pt", "last.pt", "mine.pt", "test.pt", "warmup.pt"]
    env = json.loads((example_run / "env.json").read_text())
    assert env["plugins"]["example"] == {"distribution": "stagewise-example-plugin",
                                         "version": version("stagewise-example-plugin"), "error": None}
    # the resolved recipe is a valid recipe, equal to the one that ran
    assert load_recipe(example_run / "recipe.toml").table == load_recipe(recipes["example"]).table


def test_example_stages_report_and_hand_over_an_artifact(example_run):
    summary = json.loads((example_run / "summary.json").read_text())
    assert list(summary["stages"]) == ["warmup", "mine", "hard", "test"]
    metrics = summary["metrics"]
    assert {"test/loss", "test/ppl", "test/acc", "val/entropy_bonus/loss"} <= set(metrics)
    assert 0 < metrics["mine/hard_ratio"] <= 0.5  # hard_ratio = 0.5; ties at the threshold are easy
    artifact = load_checkpoint(example_run / "checkpoints" / "last.pt")["artifacts"]["example.hard_examples"]
    assert artifact["split"] == "train" and len(artifact["indices"]) == metrics["mine/hard_examples"]
    assert artifact["router"] == {"threshold": metrics["mine/threshold"]}


def test_golden_record(example_run):
    # the example plugin's stages had no exact figure: "hard" trained on any examples but the mined ones unseen
    assert verify_run(example_run, GOLDEN) == []


def test_event_hook_logs_each_epoch_of_the_plugins_own_stages(example_run):
    logged = [(r["stage"], r["epoch"]) for r in records(example_run, "example.epoch")]
    assert logged == [("hard", 0), ("hard", 1)]


def test_bad_recipe_reports_every_problem_and_writes_nothing(cli, tmp_path):
    recipe = tmp_path / "bad.toml"
    recipe.write_text(BAD_RECIPE)
    result = cli("run", recipe, cwd=tmp_path, ok=False)
    assert result.returncode == 1
    err = result.stderr
    assert f"{recipe}: 3 problems" in err, err
    assert "run.seeed: unknown key; did you mean 'seed'? Valid keys: " in err
    assert "data.batch_size: expected int, got str 'big'" in err
    assert "stages.phase1.use: unknown stage 'stagewise.trian'; did you mean 'stagewise.train'?" in err
    assert "Installed stages: " in err and "example.mine_hard" in err
    assert [p.name for p in tmp_path.iterdir()] == ["bad.toml"]  # no runs/ folder


def test_reporting_on_the_mined_split_is_refused_before_the_run(cli, tmp_path):
    # the example's mine stage says in fits_on() that it calibrates and mines `train`
    result = cli("run", "example.hard_examples", "--set", 'stages.test.split="train"', cwd=tmp_path, ok=False)
    assert result.returncode == 1
    assert ("stages.test.split (from --set stages.test.split=\"train\"): 'train' is not held-out: stage 'mine' "
            "calibrated the router and mined the hard examples; report on a split no earlier stage fits on "
            "(or set allow_leak = true") in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_verify_passes_on_a_match_and_prints_the_difference_otherwise(cli, example_run, tmp_path):
    metrics = json.loads((example_run / "summary.json").read_text())["metrics"]
    golden = tmp_path / "golden.json"
    golden.write_text(json.dumps({"metrics": {"test/loss": metrics["test/loss"], "mine/hard_examples":
                                              metrics["mine/hard_examples"]}}))
    assert cli("verify", example_run, golden).stdout.strip() == "verify: OK"

    golden.write_text(json.dumps({"metrics": {"test/loss": metrics["test/loss"] + 0.5}}))
    result = cli("verify", example_run, golden, ok=False)
    assert result.returncode == 1
    assert f"test/loss: run {metrics['test/loss']!r} != golden {metrics['test/loss'] + 0.5!r}" in result.stdout
    assert "verify: 1 difference(s)" in result.stdout


@pytest.fixture(scope="module")
def example_export(cli, example_run, tmp_path_factory) -> Path:
    """``stagewise export`` of the example run, shared by the tests that only read the file."""
    out = tmp_path_factory.mktemp("export") / "model.npz"
    cli("export", example_run, out)
    return out


def test_export_writes_a_numpy_only_file(example_export, example_run):
    out = example_export
    saved = load_checkpoint(example_run / "checkpoints" / "last.pt")
    weights, mined = saved["model"], saved["artifacts"]["example.hard_examples"]
    with np.load(out, allow_pickle=False) as data:  # the weights, the mining stage's artifact beside them, __meta__
        assert set(data.files) == {*weights, "artifacts/example.hard_examples/indices", "__meta__"}
        np.testing.assert_array_equal(data["embedding.weight"], weights["embedding.weight"].numpy())
        np.testing.assert_array_equal(data["artifacts/example.hard_examples/indices"], mined["indices"].numpy())
        meta = json.loads(str(data["__meta__"]))
    assert meta["model"] == "stagewise.transformer" and meta["model_options"]["n_embd"] == 16
    assert meta["artifacts"]["example.hard_examples"] == {"split": mined["split"], "router": mined["router"]}


def test_an_export_carries_the_router_a_plugin_s_stage_kept(example_export, example_run):
    from stagewise.export import load_npz

    meta = load_npz(example_export)[1]
    threshold = json.loads((example_run / "summary.json").read_text())["metrics"]["mine/threshold"]
    router = load_recipe(example_run / "recipe.toml").table["stages"][1]["router"]
    assert meta["routers"] == {"mine": {"use": "example.loss_quantile", "options": {"hard_ratio": router["hard_ratio"]},
                                        "state": {"threshold": float(np.float32(threshold))}}}


def test_compare_runs_baseline_and_method(cli, recipes, example_run, tmp_path):
    out = tmp_path / "compare"
    result = cli("compare", recipes["baseline"], recipes["example"], "--out", out, "--quiet")
    runs = json.loads((out / "compare.json").read_text())["runs"]
    assert list(runs) == ["baseline", "example"]
    for name, run in runs.items():
        assert Path(run["run_dir"]) == out / name and "test/loss" in run["metrics"]
        assert run["metrics"] == json.loads((out / name / "summary.json").read_text())["metrics"]
    # each recipe ran as `stagewise run` runs it alone: same seed, same numbers
    assert runs["example"]["metrics"] == json.loads((example_run / "summary.json").read_text())["metrics"]
    assert "mine/threshold" in runs["example"]["metrics"] and "mine/threshold" not in runs["baseline"]["metrics"]
    assert result.stdout.splitlines()[0].split() == ["metric", "baseline", "example", "example", "vs", "baseline"]

    (out / "baseline" / "summary.json").unlink()  # as if baseline had stopped part-way
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    again = cli("compare", recipes["baseline"], recipes["example"], "--out", out, "--quiet", ok=False)
    assert again.returncode == 1 and f"not empty; pass --resume {out} to continue that comparison" in again.stderr
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # refused before running either
    cli("compare", recipes["baseline"], recipes["example"], "--resume", out, "--quiet")  # both had finished
    assert json.loads((out / "compare.json").read_text())["runs"] == runs


def test_compare_default_folder_is_never_reused(cli, recipes, tmp_path):
    (tmp_path / "runs" / "compare").mkdir(parents=True)
    (tmp_path / "runs" / "compare" / "earlier.txt").write_text("an earlier comparison")
    cli("compare", recipes["baseline"], recipes["example"], "--quiet", cwd=tmp_path)
    assert (tmp_path / "runs" / "compare-2" / "compare.json").exists()
