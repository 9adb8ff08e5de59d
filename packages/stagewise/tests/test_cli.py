"""The command line in-process: contracts other tools rely on, and errors as messages."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import RunsCode, read_summary

import stagewise
from stagewise import __version__
from stagewise.cli.main import main
from stagewise.engine.checkpoint import load_checkpoint
from stagewise.engine.runner import run_recipe
from stagewise.export import load_npz
from stagewise.recipe import load_recipe
from stagewise.testing import run_killed
from stagewise.verify import verify_run


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out == f"stagewise {__version__}\n"


def test_plugins_json_contract(capsys):
    assert main(["plugins", "--json"]) == 0
    core = next(p for p in json.loads(capsys.readouterr().out) if p["name"] == "stagewise")
    assert {"name", "distribution", "version", "stages", "routers", "losses", "models", "datasets",
            "recipes", "error"} <= set(core)
    assert core["stages"] == ["stagewise.train", "stagewise.evaluate"] and core["error"] is None


def test_recipes_lists_the_demo(capsys):
    assert main(["recipes"]) == 0
    assert "stagewise.demo" in capsys.readouterr().out


def test_run_verify_export(tiny_recipe_path, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["run", str(tiny_recipe_path), "--out", str(run_dir), "--quiet",
                 "--set", "stages.phase2.max_epochs=1"]) == 0
    assert capsys.readouterr().out == f"{run_dir}\n"  # --quiet: where the run went, nothing else
    metrics = read_summary(run_dir)["metrics"]

    golden = tmp_path / "golden.json"
    golden.write_text(json.dumps({"metrics": {"val/loss": metrics["val/loss"], "test/acc": metrics["test/acc"]}}))
    assert main(["verify", str(run_dir), str(golden)]) == 0
    assert capsys.readouterr().out.endswith("verify: OK\n")

    golden.write_text(json.dumps({"metrics": {"val/loss": metrics["val/loss"] + 1e-3, "nope": 1},
                                  "tolerance": {"val/loss": 1e-2}}))
    assert main(["verify", str(run_dir), str(golden)]) == 1
    out = capsys.readouterr().out
    assert "nope: missing from the run" in out and "val/loss" not in out and "1 difference(s)" in out

    for bad, problem in [({"metrics": [1]}, "'metrics' must be an object"),
                         ({"metrics": {}, "tolerance": {"val/loss": "0.1"}}, "'tolerance' must be an object"),
                         ([1], "'metrics' must be an object")]:
        golden.write_text(json.dumps(bad))
        assert main(["verify", str(run_dir), str(golden)]) == 1
        assert f"{golden}: 1 problem:\n  - {problem}" in capsys.readouterr().err
    assert main(["verify", str(run_dir), str(tmp_path)]) == 1  # a folder, not a golden file
    assert "cannot read the golden file" in capsys.readouterr().err

    assert main(["export", str(run_dir), str(tmp_path / "model.npz")]) == 0
    arrays, meta = load_npz(tmp_path / "model.npz")
    assert meta["model"] == "stagewise.transformer" and meta["model_options"]["n_layer"] == 3
    saved = load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]
    assert sorted(arrays) == sorted(saved)
    assert all(np.array_equal(arrays[k], saved[k].numpy()) for k in saved)


def test_an_export_holds_the_data_facts_and_the_vocabulary(tiny_recipe_path, tmp_path):
    # was: no vocab_size and no vocabulary: a numpy-only consumer could not turn ids into words
    from stagewise.data import Vocabulary
    from stagewise.export import export_npz

    run_dir = tmp_path / "run"
    assert main(["run", str(tiny_recipe_path), "--out", str(run_dir), "--quiet", "--set", "stages.phase1.max_epochs=1",
                 "--set", "stages.phase2.max_epochs=1"]) == 0
    export_npz(run_dir / "checkpoints" / "phase1.pt", tmp_path / "m.npz")
    arrays, meta = load_npz(tmp_path / "m.npz")
    vocab = Vocabulary.from_file(run_dir / "vocab.txt")
    assert meta["data_info"] == load_checkpoint(run_dir / "checkpoints" / "phase1.pt")["data_info"]
    assert meta["vocab"] == vocab.itos and meta["data_info"]["vocab_size"] == len(vocab)
    assert arrays["embedding.weight"].shape[0] == len(vocab)


def test_an_export_carries_the_artifacts_plugins_keep_beside_the_model(tiny_recipe_path, tmp_path, capsys):
    # was: the export held the model alone, so what a stage kept in state.artifacts was lost
    import torch

    from stagewise.plugins import register_plugin, unregister_plugin

    class Keeps:
        @stagewise.hookimpl
        def stagewise_after_stage(self, state):
            state.artifacts["clitest.kept"] = {"state": {"w/1": torch.arange(6.0).view(2, 3), "n": torch.tensor(4)},
                                               "scale": 0.5, "tags": ["a", torch.tensor([1, 2])], "empty": {}}
            state.artifacts["clitest.count"] = 12

    register_plugin(Keeps(), "clitest")
    try:
        assert main(["run", str(tiny_recipe_path), "--out", str(tmp_path / "run"), "--quiet",
                     "--set", "stages.phase1.max_epochs=1", "--set", "stages.phase2.max_epochs=1"]) == 0
    finally:
        unregister_plugin("clitest")
    capsys.readouterr()
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "m.npz")]) == 0
    assert capsys.readouterr().out.endswith("values; artifacts: clitest.count, clitest.kept\n")
    with np.load(tmp_path / "m.npz", allow_pickle=False) as data:  # what a numpy-only reader sees
        np.testing.assert_array_equal(data["artifacts/clitest.kept/state/w%2F1"], np.arange(6.0).reshape(2, 3))
        assert data["artifacts/clitest.kept/state/n"].dtype == np.int64
        assert json.loads(str(data["__meta__"]))["artifacts"] == {
            "clitest.kept": {"state": {}, "scale": 0.5, "tags": ["a", [1, 2]], "empty": {}}, "clitest.count": 12}
    arrays, meta = load_npz(tmp_path / "m.npz")
    assert sorted(arrays) == sorted(load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["model"])
    kept = meta["artifacts"]["clitest.kept"]
    assert kept["state"]["w/1"].tolist() == [[0, 1, 2], [3, 4, 5]] and int(kept["state"]["n"]) == 4
    assert meta["artifacts"]["clitest.count"] == 12 and kept["empty"] == {}


def test_export_leaves_out_the_artifacts_it_is_told_to_and_names_the_others_on_a_typo(tmp_path, capsys):
    import torch

    artifacts = {"x.cache": {"hidden": torch.zeros(4, 2)}, "x.router": {"threshold": 0.5}}
    ckpt = _checkpoint(tmp_path / "c.pt", {"w": torch.ones(2)}, artifacts=artifacts)
    assert main(["export", str(ckpt), str(tmp_path / "m.npz"), "--exclude-artifact", "x.cache"]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'm.npz'}: 1 arrays, 2 values; artifacts: x.router\n"
    arrays, meta = load_npz(tmp_path / "m.npz")
    assert list(arrays) == ["w"] and meta["artifacts"] == {"x.router": {"threshold": 0.5}}
    assert main(["export", str(ckpt), str(tmp_path / "n.npz"), "--exclude-artifact", "x.cahce"]) == 1
    assert capsys.readouterr().err == (f"stagewise: error: {ckpt}: holds no artifact named 'x.cahce' to leave out; "
                                       f"it holds: x.cache, x.router\n")
    assert not (tmp_path / "n.npz").exists()


def test_run_says_where_it_writes_before_the_first_stage(tiny_recipe_path, tmp_path, capsys):
    # was: the run directory was named only by the final table, so a long run's files could not be found
    run_dir = tmp_path / "run"
    assert main(["run", str(tiny_recipe_path), "--out", str(run_dir), "--set", "stages.phase2.max_epochs=1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"run 'tiny' (seed 7): writing to {run_dir}"
    assert out[1].startswith("[phase1] epoch 1/2")
    assert f"run 'tiny' (seed 7) -> {run_dir}" in out  # the final table still says it


def test_errors_are_one_message_and_exit_1(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[model]\nuse = "stagewise.transformer"\n[[stages]]\nname = "a"\nlr = "fast"\n')
    assert main(["run", str(bad), "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"stagewise: error: {bad}: 1 problem:") and "stages.a.lr: expected float" in err
    assert not (tmp_path / "run").exists()  # nothing written


def test_bad_data_path_writes_nothing(tiny_recipe_path, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", str(tiny_recipe_path), "--out", str(out), "--set", f"data.path={tmp_path / 'missing'}"])
    assert code == 1 and "missing" in capsys.readouterr().err and not out.exists()


def test_a_glob_set_by_set_is_marked_when_the_stage_start_refuses_it(tiny_recipe_path, tmp_path, capsys, monkeypatch):
    # a model the meta device cannot build: its globs are checked only as the stage starts (was unmarked)
    monkeypatch.setattr("stagewise.builtins.train.parameter_names_at", lambda recipe, index, data: None)
    args = ["run", str(tiny_recipe_path), "--out", str(tmp_path / "run"), "--quiet"]
    assert main([*args, "--set", 'stages.phase1.freeze=["nope.*"]']) == 1
    assert (f"stagewise: error: {tiny_recipe_path}: 1 problem:\n  - stages.phase1.freeze (from --set "
            f'stages.phase1.freeze=["nope.*"]): \'nope.*\' matches no parameter;') in capsys.readouterr().err


def test_a_device_set_by_set_is_marked_when_the_machine_has_none(tiny_recipe_path, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main(["run", str(tiny_recipe_path), "--out", str(tmp_path / "run"), "--set", "run.device=cuda"]) == 1
    assert capsys.readouterr().err == (f"stagewise: error: {tiny_recipe_path}: 1 problem:\n  - run.device (from --set "
                                       f"run.device=cuda): 'cuda' was asked for but no CUDA device is available; "
                                       f"use 'auto' or 'cpu'\n")
    assert not (tmp_path / "run").exists()


def test_verify_needs_a_finished_run(tmp_path, capsys):
    (tmp_path / "g.json").write_text('{"metrics": {}}')
    assert main(["verify", str(tmp_path), str(tmp_path / "g.json")]) == 1
    assert "did the run finish?" in capsys.readouterr().err


def test_show_prints_one_runs_final_table_and_several_runs_side_by_side(tiny_recipe_path, tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["run", str(tiny_recipe_path), "--out", str(first), "--set", "stages.phase2.max_epochs=1"]) == 0
    printed = capsys.readouterr().out
    assert main(["show", str(first)]) == 0
    assert capsys.readouterr().out in printed  # the table the run printed at its end, whole
    assert main(["run", str(tiny_recipe_path), "--out", str(second), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["show", str(first), str(second)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["metric", str(first), str(second), f"{second}", "vs", f"{first}"]
    a, b = (read_summary(run)["metrics"]["test/loss"] for run in (first, second))
    assert next(row for row in table if row.startswith("test/loss ")).split() == [
        "test/loss", f"{a:.6g}", f"{b:.6g}", f"{100 * (b - a) / abs(a):+.2f}%"]


def test_show_says_how_to_continue_a_run_that_was_stopped(tiny_recipe_path, tmp_path, capsys):
    killed = tmp_path / "killed"
    run_killed(tiny_recipe_path, killed, "phase2", 4)
    assert main(["show", str(killed)]) == 1
    command = f"stagewise run {killed / 'recipe.toml'} --resume {killed}"
    assert capsys.readouterr().err == (f"stagewise: error: {killed / 'summary.json'} not found: the run has not "
                                       f"finished; if it was stopped, '{command}' continues it\n")
    assert main(command.split()[1:] + ["--quiet"]) == 0  # the command it gives does continue the run
    capsys.readouterr()
    assert main(["show", str(killed)]) == 0 and "test/loss" in capsys.readouterr().out


def test_show_of_a_comparisons_folder_shows_its_runs_side_by_side(tmp_path, capsys):
    from stagewise.engine.rundir import write_json_atomic

    out = tmp_path / "compare"
    for name, loss in (("base", 2.0), ("method", 1.5)):
        write_json_atomic(out / name / "summary.json", {"metrics": {"test/loss": loss}})
    write_json_atomic(out / "compare.json", {"runs": {"base": {}, "method": {}}})
    assert main(["show", str(out)]) == 0
    header, row = (line.split() for line in capsys.readouterr().out.splitlines())
    assert header == ["metric", str(out / "base"), str(out / "method"), str(out / "method"), "vs", str(out / "base")]
    assert row == ["test/loss", "2", "1.5", "-25.00%"]  # in compare.json's order: the first is the baseline
    write_json_atomic(out / "compare.json", ["base"])
    assert main(["show", str(out)]) == 1
    assert capsys.readouterr().err == (f"stagewise: error: {out / 'compare.json'} has no 'runs' object: is {out} "
                                       f"the --out of a comparison?\n")


def test_show_reads_every_run_before_printing(tiny_recipe_path, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["run", str(tiny_recipe_path), "--out", str(run_dir), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["show", str(run_dir), str(tmp_path / "nope")]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err == (f"stagewise: error: {tmp_path / 'nope' / 'summary.json'}: summary.json "
                                 f"(did the run finish?) not found\n")


class _Timed(stagewise.Stage):
    """Reports one wall-clock figure (declared measured) and one count."""

    name = "clitest.timed"
    measured = ("took_ms",)

    def run(self, state):
        return {f"{self.label}/took_ms": 12.5, f"{self.label}/count": 3}


def test_verify_leaves_a_runs_wall_clock_measurements_out_unless_given_a_tolerance(tiny_recipe_path, tmp_path,
                                                                                  capsys):
    from stagewise.plugins import register_plugin, unregister_plugin

    class Timed:
        @stagewise.hookimpl
        def stagewise_register_stages(self, register):
            register(_Timed)

    recipe = tmp_path / "timed.toml"
    recipe.write_text(tiny_recipe_path.read_text() + '\n[[stages]]\nname = "clock"\nuse = "clitest.timed"\n')
    register_plugin(Timed(), "clitest")
    try:
        run_dir = run_recipe(load_recipe(recipe, ["stages.phase1.max_epochs=1", "stages.phase2.max_epochs=1"]),
                             out=tmp_path / "run", quiet=True)
    finally:
        unregister_plugin("clitest")
    summary = read_summary(run_dir)
    assert summary["stages"]["clock"]["measured"] == ["clock/took_ms"] and summary["stages"]["phase1"]["measured"] == []
    other = {**summary, "metrics": {**summary["metrics"], "clock/took_ms": 14.0}}  # another run's timing
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert main(["verify", str(run_dir), str(tmp_path / "other.json")]) == 0
    assert capsys.readouterr().out == ("verify: OK (1 wall-clock measurement(s) not compared: clock/took_ms; "
                                       "give one a tolerance in the golden file to compare it)\n")
    other["metrics"]["clock/count"] = 4  # a counted figure is still compared
    other["tolerance"] = {"clock/took_ms": 1.0}  # and a measurement given a tolerance is too
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert main(["verify", str(run_dir), str(tmp_path / "other.json")]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "clock/took_ms: run 12.5 != golden 14.0 (diff -1.5, tolerance 1.0)"
    assert out[1] == "clock/count: run 3 != golden 4 (diff -1, tolerance 0.0)" and out[2] == "verify: 2 difference(s)"


def test_out_must_be_a_new_or_empty_folder(tiny_recipe_path, tmp_path, capsys):
    (tmp_path / "notes.csv").write_text("kept")
    assert main(["run", str(tiny_recipe_path), "--out", str(tmp_path / "notes.csv"), "--quiet"]) == 1
    assert "notes.csv is a file, not a folder; pass --resume" in capsys.readouterr().err
    assert main(["run", str(tiny_recipe_path), "--out", str(tmp_path), "--quiet"]) == 1
    assert f"{tmp_path} is not empty; pass --resume {tmp_path} to continue that run" in capsys.readouterr().err
    assert (tmp_path / "notes.csv").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.csv", "tiny.toml"]  # nothing written


def test_out_expands_the_home_folder(tiny_recipe_path, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(tiny_recipe_path), "--out=~/run", "--quiet", "--set", "stages.phase1.max_epochs=1"]) == 0
    assert (tmp_path / "home" / "run" / "summary.json").is_file() and not (tmp_path / "~").exists()


def test_run_files_get_the_usual_permissions(tiny_recipe_path, tmp_path):
    import os
    import stat

    run_dir = tmp_path / "run"
    assert main(["run", str(tiny_recipe_path), "--out", str(run_dir), "--quiet",
                 "--set", "stages.phase2.max_epochs=1"]) == 0
    mask = os.umask(0)
    os.umask(mask)
    for name in ("recipe.toml", "env.json", "summary.json", "metrics.jsonl", "checkpoints/last.pt"):
        assert stat.S_IMODE((run_dir / name).stat().st_mode) == 0o666 & ~mask, name  # as open() makes them


def test_verify_tolerance_is_inclusive_and_nan_matches_nan():
    from stagewise.verify import compare

    golden = {"a": 1.0, "b": float("nan"), "c": 2}
    assert compare({"a": 1.5, "b": float("nan"), "c": 2}, golden, {"a": 0.5}) == []  # |1.5 - 1| <= 0.5
    (problem,) = compare({"a": 1.75, "b": float("nan"), "c": 2}, golden, {"a": 0.5})
    assert problem.startswith("a: run 1.75 != golden 1.0 (diff +0.75, tolerance 0.5)")
    assert compare({"a": 1.0, "b": 0.0, "c": 2}, golden, {})[0].startswith("b: run 0.0 != golden nan")


def test_a_bad_or_misspelt_tolerance_is_named(tmp_path):
    # was: "'tolerance' must be ..." without the entry at fault, and a tolerance for a metric the golden
    # record lacks (a typo) ignored, its metric compared exactly
    from stagewise.verify import golden_tables

    for tolerance, named in (({"a": -0.5}, "'a' is -0.5"), ({"a": math.nan}, "'a' is NaN")):
        with pytest.raises(stagewise.ConfigError, match=f"numbers >= 0 .*: {named}$"):
            golden_tables({"metrics": {"a": 1.0}, "tolerance": tolerance}, tmp_path / "g.json")
    with pytest.raises(stagewise.ConfigError, match=r"'tolerance' names 'b', which 'metrics' lacks"):
        golden_tables({"metrics": {"a": 1.0}, "tolerance": {"a": 0.1, "b": 0.1}}, tmp_path / "g.json")


def test_a_golden_file_may_give_a_tolerance_of_zero(tmp_path):
    from stagewise.verify import golden_tables

    golden = {"metrics": {"a": 1.0}, "tolerance": {"a": 0}}  # >= 0, as documented: the same as no tolerance
    assert golden_tables(golden, tmp_path / "g.json") == ({"a": 1.0}, {"a": 0})
    with pytest.raises(stagewise.ConfigError, match="'tolerance' must be an object of metric names and numbers >= 0"):
        golden_tables({**golden, "tolerance": {"a": -0.5}}, tmp_path / "g.json")


def test_the_final_table_keeps_long_names_values_in_one_column(tmp_path):
    # was: a 38-character metric (lego_ashem's phase2/phase2_token_mode_speedup_flops) or a 17-character
    # stage name pushed its value out of the column the others are in
    from stagewise.engine.runner import final_table

    summary = {"recipe": "r", "seed": 0, "stages": {"s": {"epochs": 1, "seconds": 0.1},
                                                    "a_long_stage_name": {"epochs": 2, "seconds": 0.2}},
               "metrics": {"val/loss": 3.25, "phase2/phase2_token_mode_speedup_flops": 2.5}}
    stages, metrics = final_table(summary, tmp_path).split("\n\n")[1:]
    for table in (stages, metrics):
        ends = {len(line) for line in table.splitlines()}
        assert len(ends) == 1, table  # every row's last (right-aligned) column ends at the same place
    assert "phase2/phase2_token_mode_speedup_flops  " in metrics  # and a gap before it


def test_compare_sets_a_stage_key_only_in_the_recipes_that_have_that_stage(tiny_recipe_path, tmp_path, capsys):
    from stagewise.compare import compare_recipes
    from stagewise.errors import ConfigError

    text = tiny_recipe_path.read_text().replace('name = "tiny"', 'name = "renamed"')
    other = tmp_path / "renamed.toml"
    other.write_text(text.replace('name = "phase1"', 'name = "train"'))  # the baseline's name for it
    names = [str(tiny_recipe_path), str(other)]
    runs = compare_recipes(names, ["stages.phase1.max_epochs=1", "stages.train.max_epochs=1",
                                   "stages.phase2.max_epochs=1"], tmp_path / "cmp", quiet=True)
    out = capsys.readouterr().out
    assert f"compare: --set stages.phase1.max_epochs=1 applies to {names[0]} only ({names[1]}: no stage named " \
           f"'phase1')" in out and f"--set stages.train.max_epochs=1 applies to {names[1]} only" in out
    assert "phase2.max_epochs" not in out  # both have it: nothing to say
    for name, first in (("tiny", "phase1"), ("renamed", "train")):
        stages = read_summary(tmp_path / "cmp" / name)["stages"]
        assert stages[first]["epochs"] == 1 and stages["phase2"]["epochs"] == 1
    assert runs["tiny"]["metrics"] == runs["renamed"]["metrics"]  # the same training under either name
    with pytest.raises(ConfigError, match="no stage named 'phase9'"):  # in no recipe: an error, as ever
        compare_recipes(names, ["stages.phase9.max_epochs=1"], tmp_path / "cmp2", quiet=True)


def test_compare_sets_a_loss_terms_key_only_in_the_recipes_whose_stage_has_that_term(tiny_recipe_path, tmp_path,
                                                                                       capsys):
    # was: `stagewise compare koopman.baseline koopman.hybrid --set stages.main.losses.koopman.weight=0.5`
    # went to the baseline's 'main' too, which has no 'koopman' term: "no loss term named 'koopman'"
    from stagewise.compare import overrides_by_recipe

    method = tmp_path / "method.toml"
    method.write_text(tiny_recipe_path.read_text().replace('name = "tiny"', 'name = "method"').replace(
        'grad_clip = 1.0', 'grad_clip = 1.0\nlosses = [{ use = "stagewise.cross_entropy" }, '
                           '{ use = "stagewise.cross_entropy", name = "exit1", at_layer = 1, weight = 0.5 }]'))
    names = [str(tiny_recipe_path), str(method)]
    term, stage = "stages.phase1.losses.exit1.weight=0.25", "stages.phase1.max_epochs=1"
    assert overrides_by_recipe(names, [term, stage]) == [[stage], [term, stage]]
    assert capsys.readouterr().out == (f"compare: --set {term} applies to {names[1]} only ({names[0]}: no loss "
                                       f"term 'exit1' in stage 'phase1')\n")
    assert load_recipe(names[1], [term]).table["stages"][0]["losses"][1]["weight"] == 0.25
    typo = "stages.phase1.losses.exit9.weight=0.25"  # in no recipe: to all, whose errors name it
    assert overrides_by_recipe(names, [typo]) == [[typo], [typo]]


def test_compare_removes_a_stage_or_term_only_from_the_recipes_that_have_it(tiny_recipe_path, tmp_path, capsys):
    from stagewise.compare import overrides_by_recipe

    method = tmp_path / "method.toml"
    method.write_text(tiny_recipe_path.read_text().replace('name = "tiny"', 'name = "method"').replace(
        'grad_clip = 1.0', 'grad_clip = 1.0\nlosses = [{ use = "stagewise.cross_entropy" }, '
                           '{ use = "stagewise.cross_entropy", name = "exit1", at_layer = 1, weight = 0.5 }]').replace(
        'name = "test"', 'name = "forward"'))
    names = [str(tiny_recipe_path), str(method)]
    stage, term, key = "~stages.forward", "~stages.phase1.losses.exit1", "~stages.phase1.grad_clip"
    assert overrides_by_recipe(names, [stage, term, key]) == [[key], [stage, term, key]]
    assert capsys.readouterr().out.splitlines() == [
        f"compare: --set {stage} applies to {names[1]} only ({names[0]}: no stage named 'forward')",
        f"compare: --set {term} applies to {names[1]} only ({names[0]}: no loss term 'exit1' in stage 'phase1')"]
    assert [s.name for s in load_recipe(names[1], [stage, term]).stages] == ["phase1", "phase2"]


def test_compare_refuses_other_seeds_and_other_data(tiny_recipe_path, tmp_path):
    from stagewise.compare import compare_recipes
    from stagewise.errors import ConfigError

    text = tiny_recipe_path.read_text().replace('name = "tiny"', 'name = "other"')
    for change, problem in [(("seed = 7", "seed = 8"), "run.seed 8 differs from 7"),
                            (("seq_len = 8", "seq_len = 4"), "[data] differs from")]:  # naming the key: below
        other = tmp_path / "other.toml"
        other.write_text(text.replace(*change))
        with pytest.raises(ConfigError) as info:
            compare_recipes([str(tiny_recipe_path), str(other)], [], tmp_path / "cmp", quiet=True)
        (found,) = info.value.problems
        assert found.startswith(f"{other}: ") and problem in found
        assert not (tmp_path / "cmp").exists()  # refused before any run
    assert found == (f"{other}: [data] differs from {tiny_recipe_path} in seq_len; compare on the same data: add "
                     f"--set data.seq_len=8 (a --set of data.* applies to every recipe compared)")
    other.write_text(text.replace("seq_len = 8", 'seq_len = 4\nlowercase = false\npath = "my text"'))
    with pytest.raises(ConfigError) as info:  # the first recipe's values; a key it leaves unset, the other's
        compare_recipes([str(tiny_recipe_path), str(other)], [], tmp_path / "cmp", quiet=True)
    assert (f"add --set data.lowercase=true --set 'data.path=\"{tmp_path / 'my text'}\"' --set data.seq_len=8 ("
            in info.value.problems[0])  # quoted for the shell


def test_no_command_prints_the_help_and_exits_2(capsys):
    assert main([]) == 2  # as argparse's own usage errors: a wrong invocation is not success
    assert "run a recipe file or a named recipe" in capsys.readouterr().out


def _with_command(handler):
    """Register a one-off subcommand ``boom`` whose handler is ``handler``."""
    import stagewise
    from stagewise import plugins

    class Boom:
        @stagewise.hookimpl
        def stagewise_register_commands(self, cli):
            cli.add_parser("boom").set_defaults(handler=handler)

    plugins.register_plugin(Boom(), "boom")


def test_ctrl_c_exits_130_with_one_line(capsys):
    from stagewise import plugins

    def interrupted(args):
        raise KeyboardInterrupt

    _with_command(interrupted)
    try:
        assert main(["boom"]) == 130  # 128 + SIGINT, what shells report for Ctrl-C
    finally:
        plugins.unregister_plugin("boom")
    assert capsys.readouterr().err == "stagewise: interrupted\n"


def test_a_reader_that_stops_reading_ends_the_command_quietly():
    # `stagewise recipes | head -1`: was "stagewise: error: Broken pipe; check the path" and exit 1
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the command writes
    try:
        child = subprocess.run([sys.executable, "-m", "stagewise", "recipes"], stdout=write,
                               stderr=subprocess.PIPE, text=True)
    finally:
        os.close(write)
    assert (child.returncode, child.stderr) == (141, "")  # 128 + SIGPIPE, as for `yes | head -1`


class _CtrlC:
    at: tuple[str, int] = ("", 0)  # (stage, step) after which Ctrl-C comes

    @stagewise.hookimpl
    def stagewise_after_step(self, state):
        if (state.stage_name, state.step) == self.at:
            raise KeyboardInterrupt


@pytest.mark.parametrize("at, resumed", [(("phase2", 2), "resuming {run} at stage 2/3"),
                                         (("phase1", 1), "{run} has no checkpoint yet: running it again from "
                                                         "the start")], ids=["mid-stage", "before-any-checkpoint"])
def test_ctrl_c_during_a_run_prints_the_command_that_continues_it(tiny_recipe_path, tmp_path, capsys, at, resumed):
    from stagewise import plugins

    run, sets = tmp_path / "my run", ["--set", "run.checkpoint_every_n_steps=1"]
    ctrl_c = _CtrlC()
    ctrl_c.at = at
    plugins.register_plugin(ctrl_c, "ctrlc")
    try:
        assert main(["run", str(tiny_recipe_path), "--out", str(run), "--quiet", *sets]) == 130
    finally:
        plugins.unregister_plugin("ctrlc")
    again = f"stagewise run {tiny_recipe_path} --resume '{run}' --set run.checkpoint_every_n_steps=1"
    assert capsys.readouterr().err == f"stagewise: interrupted; continue with: {again}\n"  # was: interrupted
    assert main(["run", str(tiny_recipe_path), "--resume", str(run), *sets]) == 0  # what it says, run
    assert resumed.format(run=run) in capsys.readouterr().out
    assert read_summary(run)["metrics"] == read_summary(run_recipe(load_recipe(tiny_recipe_path, sets[1:]),
                                                                   out=tmp_path / "whole", quiet=True))["metrics"]


@pytest.mark.parametrize("at, said, then", [
    ("env.json", "; continue with: stagewise run {recipe} --resume '{run}'", "--resume"),  # was: interrupted
    ("recipe.toml", "", "--out"),  # nothing of the run written yet: nothing to resume, --out takes the folder again
], ids=["after-recipe-toml", "before-recipe-toml"])
def test_ctrl_c_while_the_run_folder_is_made_prints_the_command_that_continues_it(tiny_recipe_path, tmp_path, capsys,
                                                                                 monkeypatch, at, said, then):
    from stagewise.engine import rundir

    def ctrl_c_at(write):
        def written(path, data, **how):  # how: write_text_atomic's replace=
            if path.name == at:
                raise KeyboardInterrupt
            write(path, data, **how)
        return written

    for name in ("write_text_atomic", "write_json_atomic"):
        monkeypatch.setattr(rundir, name, ctrl_c_at(getattr(rundir, name)))
    run = tmp_path / "my run"
    assert main(["run", str(tiny_recipe_path), "--out", str(run), "--quiet"]) == 130
    assert capsys.readouterr().err == f"stagewise: interrupted{said.format(recipe=tiny_recipe_path, run=run)}\n"
    monkeypatch.undo()
    assert main(["run", str(tiny_recipe_path), then, str(run), "--quiet"]) == 0  # what it says, run


def test_a_plugin_errors_cause_is_shown_only_in_strict_mode(monkeypatch, capsys):
    from stagewise import plugins
    from stagewise.errors import PluginError

    def broken(args):
        try:
            raise ValueError("the cause")  # e.g. in the plugin's import-time code
        except ValueError as exc:
            raise PluginError("plugin 'x' is broken") from exc

    _with_command(broken)
    try:
        monkeypatch.setenv("STAGEWISE_STRICT_PLUGINS", "0")  # "0" is off, as unset
        assert main(["boom"]) == 1
        assert capsys.readouterr().err == "stagewise: error: plugin 'x' is broken\n"  # no traceback
        monkeypatch.setenv("STAGEWISE_STRICT_PLUGINS", "1")
        assert main(["boom"]) == 1
        err = capsys.readouterr().err
        assert "Traceback" in err and "ValueError: the cause" in err
        assert err.endswith("stagewise: error: plugin 'x' is broken\n")
    finally:
        plugins.unregister_plugin("boom")


def _fake_run(tmp_path, metrics):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text(json.dumps({"metrics": metrics}))
    return run_dir


def test_verify_refuses_bad_tolerances_and_bad_json(tmp_path, capsys):
    run_dir = _fake_run(tmp_path, {"val/loss": 1.0})
    golden = tmp_path / "golden.json"
    for tolerance in (-0.1, True):  # a negative tolerance matches nothing; true is not a number
        golden.write_text(json.dumps({"metrics": {"val/loss": 1.0}, "tolerance": {"val/loss": tolerance}}))
        assert main(["verify", str(run_dir), str(golden)]) == 1
        assert "'tolerance' must be an object of metric names and numbers >= 0" in capsys.readouterr().err
    golden.write_text('{"metrics": {"val/loss": 1.0,}}')  # a trailing comma
    assert main(["verify", str(run_dir), str(golden)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"stagewise: error: {golden}: 1 problem:\n  - not valid JSON") and "Traceback" not in err


def test_verify_matches_non_finite_metrics_as_summary_json_writes_them(tmp_path, capsys):
    from stagewise.engine.rundir import write_json_atomic

    run_dir = tmp_path / "run"
    write_json_atomic(run_dir / "summary.json", {"metrics": {"a": float("nan"), "b": float("inf"), "c": -float("inf")}})
    assert json.loads((run_dir / "summary.json").read_text())["metrics"]["a"] == "nan"  # strict JSON: a string
    golden = tmp_path / "golden.json"
    golden.write_text(json.dumps({"metrics": {"a": float("nan"), "b": float("inf"), "c": -float("inf")},
                                  "tolerance": {"b": 0.1}}))  # NaN / Infinity, as Python's json writes them
    assert main(["verify", str(run_dir), str(golden)]) == 0
    golden.write_text(json.dumps({"metrics": {"a": "nan", "b": "inf", "c": float("inf")}}))  # copied from a summary
    assert main(["verify", str(run_dir), str(golden)]) == 1
    assert capsys.readouterr().out.splitlines()[-2:] == ["c: run -inf != golden inf (diff -inf, tolerance 0.0)",
                                                         "verify: 1 difference(s)"]


def _summary_on(tmp_path, cpu: str, metrics: dict) -> str:
    """A run directory whose summary.json says it ran on the kind of CPU ``cpu``."""
    from stagewise.engine.rundir import write_json_atomic

    write_json_atomic(tmp_path / cpu / "summary.json", {"cpu": cpu, "metrics": metrics})
    return str(tmp_path / cpu)


def test_verify_takes_the_record_made_on_the_runs_kind_of_cpu(tmp_path, capsys):
    golden = tmp_path / "golden.json"
    golden.write_text(json.dumps({"cpu": "x AVX512", "metrics": {"a": 1.0, "n": 3},
                                  "by_cpu": {"x AVX2": {"a": 1.0000001, "n": 3}}}))
    assert main(["verify", _summary_on(tmp_path, "x AVX2", {"a": 1.0000001, "n": 3}), str(golden)]) == 0
    assert main(["verify", _summary_on(tmp_path, "x AVX512", {"a": 1.0, "n": 3}), str(golden)]) == 0
    assert capsys.readouterr().out == "verify: OK\nverify: OK\n"  # each exact against its own kind's record
    # on a kind with its own record, matching another kind's is still a match: a run matches any record exactly
    assert main(["verify", _summary_on(tmp_path, "x AVX2", {"a": 1.0, "n": 3}), str(golden)]) == 0
    capsys.readouterr()
    assert main(["verify", _summary_on(tmp_path, "x AVX2", {"a": 1.0000002, "n": 3}), str(golden)]) == 1
    assert capsys.readouterr().out.splitlines() == [  # against its own kind's record, with nothing else to say
        "a: run 1.0000002 != golden 1.0000001 (diff +1e-07, tolerance 0.0)", "verify: 1 difference(s)"]


def test_verify_on_a_kind_of_cpu_without_a_record_says_how_to_add_one(tmp_path, capsys):
    golden = tmp_path / "golden.json"
    golden.write_text(json.dumps({"metrics": {"a": 1.0, "n": 3}, "tolerance": {}}))
    run_dir = _summary_on(tmp_path, "x AVX2", {"a": 1.0000001, "n": 3, "other": 5})
    assert main(["verify", run_dir, str(golden)]) == 1
    note = (f"{golden} has no record made on this run's kind of CPU, 'x AVX2' (its records: one whose kind is not "
            f"said); CPU numbers are bit-identical on the same kind only: 'stagewise verify RUN_DIR {golden} "
            f"--add-cpu-record' adds one")
    assert capsys.readouterr().out.splitlines()[-1] == f"verify: 1 difference(s); {note}"
    assert verify_run(Path(run_dir), golden)[-1] == note  # in a test's assertion message too

    assert main(["verify", run_dir, str(golden), "--add-cpu-record"]) == 0
    assert capsys.readouterr().out == (f"verify: added the record for 'x AVX2' to {golden}; it differs from the "
                                       f"file's other records by at most 1e-07 (relative)\n")
    assert json.loads(golden.read_text()) == {"metrics": {"a": 1.0, "n": 3}, "tolerance": {},
                                              "by_cpu": {"x AVX2": {"a": 1.0000001, "n": 3}}}
    assert main(["verify", run_dir, str(golden)]) == 0
    assert main(["verify", run_dir, str(golden), "--add-cpu-record"]) == 1  # its own record is not replaced
    assert "it has a record for 'x AVX2' already; a change of it is a behaviour change" in capsys.readouterr().err


def test_verify_within_cpu_tolerance_on_a_kind_of_cpu_without_a_record(tmp_path, capsys):
    golden = tmp_path / "golden.json"
    golden.write_text(json.dumps({"cpu": "x AVX512", "metrics": {"a": 100.0, "n": 3}, "cpu_tolerance": 1e-6}))
    close, far = _summary_on(tmp_path, "y AVX2", {"a": 100.00005, "n": 3}), _summary_on(tmp_path, "z", {"a": 100.001})
    with pytest.warns(UserWarning, match="matched within cpu_tolerance 1e-06"):
        assert main(["verify", close, str(golden)]) == 0
    assert capsys.readouterr().out.startswith("verify: OK; matched within the file's cpu_tolerance 1e-06, not exactly")
    assert main(["verify", far, str(golden)]) == 1  # beyond it; and a metric the run lacks is still missing
    assert capsys.readouterr().out.splitlines()[:2] == ["a: run 100.001 != golden 100.0 (diff +0.001, tolerance 0.0)",
                                                        "n: missing from the run (golden 3)"]
    on_its_kind = _summary_on(tmp_path, "x AVX512", {"a": 100.00005, "n": 3})
    assert main(["verify", on_its_kind, str(golden)]) == 1  # the kind the record was made on: exact


@pytest.mark.parametrize("golden, problem", [
    ({"metrics": {"a": 1}, "cpu": 3}, "'cpu' must be a string"),
    ({"metrics": {"a": 1}, "cpu": ["x"]}, "'cpu' must be a string"),
    ({"metrics": {"a": 1}, "by_cpu": {"x": 1}}, "'by_cpu' must be an object of CPU kinds and objects"),
    ({"metrics": {"a": 1}, "by_cpu": {"x": {"b": 1}}},
     "by_cpu['x'] must hold the metrics 'metrics' holds: a, b differ"),
    ({"metrics": {"a": 1}, "cpu_tolerance": -1}, "'cpu_tolerance' must be a number >= 0 (relative), not -1"),
])
def test_verify_names_a_bad_cpu_record(tmp_path, capsys, golden, problem):
    (tmp_path / "golden.json").write_text(json.dumps(golden))
    assert main(["verify", _summary_on(tmp_path, "x", {"a": 1}), str(tmp_path / "golden.json")]) == 1
    assert problem in capsys.readouterr().err


def test_verify_refuses_a_cpu_that_by_cpu_names_too(tmp_path, capsys):
    # was: by_cpu's record silently took the place of 'metrics' for that kind
    golden = tmp_path / "golden.json"
    golden.write_text(json.dumps({"cpu": "x", "metrics": {"a": 1.0}, "by_cpu": {"x": {"a": 2.0}}}))
    assert main(["verify", _summary_on(tmp_path, "x", {"a": 1.0}), str(golden)]) == 1
    assert ("by_cpu names 'x', the kind of CPU 'metrics' was made on ('cpu'): a kind has one record"
            in capsys.readouterr().err)


def test_cpu_tolerance_leaves_an_infinity_exact(tmp_path):
    # was: a golden Infinity (as Python's json writes it) got an infinite tolerance and matched any number
    golden = tmp_path / "golden.json"
    for infinity in (float("inf"), "inf"):
        golden.write_text(json.dumps({"cpu": "x", "metrics": {"a": infinity, "b": 1.0}, "cpu_tolerance": 1e-3}))
        differences = verify_run(Path(_summary_on(tmp_path, "y", {"a": 5.0, "b": 1.0})), golden)
        assert differences[0] == "a: run 5.0 != golden inf (diff -inf, tolerance 0.0)"
        with pytest.warns(UserWarning, match="matched within cpu_tolerance"):  # b's tolerance is still relative
            assert verify_run(Path(_summary_on(tmp_path, "y", {"a": math.inf, "b": 1.0001})), golden) == []


def test_add_cpu_record_says_how_far_it_is_from_the_others_in_numbers_that_are_compared(tmp_path, capsys):
    # was: "at most nan" for a NaN against a number, and wall-clock measurements, never compared, counted in
    from stagewise.engine.rundir import write_json_atomic

    golden = tmp_path / "golden.json"
    golden.write_text(json.dumps({"cpu": "x", "metrics": {"a": 1.0, "t": 3.0, "n": 2.0}}))
    write_json_atomic(tmp_path / "run" / "summary.json", {"cpu": "y", "metrics": {"a": 1.1, "t": 90.0, "n": 2.0},
                                                          "stages": {"s": {"measured": ["t"]}}})
    assert main(["verify", str(tmp_path / "run"), str(golden), "--add-cpu-record"]) == 0
    assert capsys.readouterr().out.endswith("by at most 0.1 (relative)\n")
    write_json_atomic(tmp_path / "run" / "summary.json", {"cpu": "z", "metrics": {"a": 1.0, "t": 3.0, "n": "nan"}})
    assert main(["verify", str(tmp_path / "run"), str(golden), "--add-cpu-record"]) == 0
    assert capsys.readouterr().out.endswith("by at most inf (relative)\n")


def test_add_cpu_record_refuses_a_run_beyond_the_cpu_tolerance_of_every_record(tmp_path, capsys):
    # on the kind that made a record whose kind is not said, a behaviour change looks like a new kind of CPU
    golden = tmp_path / "golden.json"
    golden.write_text(json.dumps({"metrics": {"a": 1.0, "best": 2, "stopped": False}, "cpu_tolerance": 1e-3}))
    for changed in ({"a": 1.01, "best": 2, "stopped": False}, {"a": 1.0, "best": 2, "stopped": True}):
        assert main(["verify", _summary_on(tmp_path, "x", changed), str(golden), "--add-cpu-record"]) == 1
        assert "differs from each of its records by more than its cpu_tolerance 0.001" in capsys.readouterr().err
    assert json.loads(golden.read_text()) == {"metrics": {"a": 1.0, "best": 2, "stopped": False},
                                              "cpu_tolerance": 1e-3}
    assert main(["verify", _summary_on(tmp_path, "x", {"a": 1.0002, "best": 2, "stopped": False}), str(golden),
                 "--add-cpu-record"]) == 0
    assert capsys.readouterr().out.endswith("by at most 0.0002 (relative)\n")


def test_add_cpu_record_names_the_unnamed_record_a_run_matches_exactly(tmp_path, capsys):
    # then a behaviour change on that kind is exact again, not loosened by cpu_tolerance as if another kind's
    golden = tmp_path / "golden.json"
    golden.write_text(json.dumps({"metrics": {"a": 1.0}, "by_cpu": {"y": {"a": 1.1}}, "cpu_tolerance": 0.2}))
    assert main(["verify", _summary_on(tmp_path, "x", {"a": 1.0}), str(golden), "--add-cpu-record"]) == 0
    assert capsys.readouterr().out == (f"verify: the run matches the record whose kind of CPU was not said exactly: "
                                       f"named it 'x' in {golden}\n")
    assert json.loads(golden.read_text()) == {"cpu": "x", "metrics": {"a": 1.0}, "by_cpu": {"y": {"a": 1.1}},
                                              "cpu_tolerance": 0.2}
    assert main(["verify", _summary_on(tmp_path, "x", {"a": 1.01}), str(golden)]) == 1  # within 0.2, yet exact


def test_add_cpu_record_leaves_a_read_only_golden_file_alone(tmp_path, capsys):
    # was: the atomic rename replaced it all the same, with a writable file
    golden = tmp_path / "golden.json"
    golden.write_text(json.dumps({"cpu": "x", "metrics": {"a": 1.0}}))
    golden.chmod(0o444)
    assert main(["verify", _summary_on(tmp_path, "y", {"a": 1.5}), str(golden), "--add-cpu-record"]) == 1
    assert capsys.readouterr().err == (f"stagewise: error: {golden} is read-only: make it writable to add the "
                                       f"record for 'y'\n")
    assert json.loads(golden.read_text()) == {"cpu": "x", "metrics": {"a": 1.0}}


def test_a_runs_summary_and_env_say_its_kind_of_cpu(tiny_recipe_path, tmp_path):
    from stagewise.engine.cpu import cpu_kind

    assert main(["run", str(tiny_recipe_path), "--out", str(tmp_path / "run"), "--quiet",
                 "--set", "stages.phase2.max_epochs=1"]) == 0
    kind = cpu_kind()
    assert torch.backends.cpu.get_cpu_capability() in kind and platform.machine() in kind
    assert read_summary(tmp_path / "run")["cpu"] == kind
    assert json.loads((tmp_path / "run" / "env.json").read_text())["cpu"] == kind


def test_a_run_on_a_gpu_is_verified_as_that_gpus_kind_not_its_cpus(tmp_path, capsys, monkeypatch):
    # was: its summary said only the host CPU, so its GPU numbers were checked exactly against that CPU's record
    # and --add-cpu-record filed them as a CPU kind's
    from stagewise.engine import cpu
    from stagewise.engine.rundir import write_json_atomic

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: f"GPU{device.index}")
    assert (cpu.device_kind(torch.device("cpu")), cpu.device_kind(torch.device("cuda", 1))) == (None, "cuda GPU1")
    golden = tmp_path / "golden.json"
    golden.write_text(json.dumps({"cpu": "x", "metrics": {"a": 1.0}, "cpu_tolerance": 1e-2}))
    write_json_atomic(tmp_path / "run" / "summary.json", {"cpu": "x", "device": "cuda GPU1", "metrics": {"a": 1.001}})
    with pytest.warns(UserWarning, match="matched within cpu_tolerance"):
        assert main(["verify", str(tmp_path / "run"), str(golden)]) == 0
    assert "no record made on this run's kind of GPU, 'cuda GPU1'" in capsys.readouterr().out
    assert main(["verify", str(tmp_path / "run"), str(golden), "--add-cpu-record"]) == 0
    assert json.loads(golden.read_text())["by_cpu"] == {"cuda GPU1": {"a": 1.001}}


@pytest.mark.parametrize("cpuinfo, processor, machine, capability, kind", [
    ("processor\t: 0\nvendor_id\t: AuthenticAMD\n", "", "x86_64", "AVX2", "AuthenticAMD x86_64 AVX2"),
    # ARM Linux has no vendor_id (nor does 'uname -p' say one): was "aarch64 DEFAULT" for Arm's, Fujitsu's, Apple's
    ("processor\t: 0\nCPU implementer\t: 0x46\nCPU part\t: 0x001\n", "", "aarch64", "DEFAULT",
     "implementer 0x46 aarch64 DEFAULT"),
    (None, "Intel64 Family 6 Model 85 Stepping 7, GenuineIntel", "AMD64", "AVX512", "GenuineIntel AMD64 AVX512"),
    (None, "arm", "arm64", "DEFAULT", "arm64 DEFAULT"),  # macOS says no maker
])
def test_the_kind_of_cpu_names_its_maker_where_the_system_says_it(tmp_path, monkeypatch, cpuinfo, processor,
                                                                   machine, capability, kind):
    from stagewise.engine import cpu

    if cpuinfo is not None:  # None: not Linux
        (tmp_path / "cpuinfo").write_text(cpuinfo)
    monkeypatch.setattr(cpu, "CPUINFO", tmp_path / "cpuinfo")
    monkeypatch.setattr(platform, "processor", lambda: processor)
    monkeypatch.setattr(platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert cpu.cpu_kind() == kind


def test_verify_against_another_run_s_summary_says_whose_it_is(tmp_path, capsys):
    # was: only the differences (36 of them for demo against koopman.hybrid), with no hint that the recipes differ
    from stagewise.engine.rundir import write_json_atomic

    write_json_atomic(tmp_path / "run" / "summary.json", {"recipe": "demo", "metrics": {"a": 1.0}})
    golden = tmp_path / "golden.json"
    golden.write_text(json.dumps({"recipe": "koopman_hybrid", "metrics": {"a": 2.0}}))
    assert main(["verify", str(tmp_path / "run"), str(golden)]) == 1
    assert capsys.readouterr().out.splitlines()[-1] == (
        "verify: 1 difference(s); the golden record is of run 'koopman_hybrid', this run is 'demo': "
        "is it another recipe's record?")
    golden.write_text(json.dumps({"recipe": "koopman_hybrid", "metrics": {"a": 1.0}}))  # a rerun under another name
    assert main(["verify", str(tmp_path / "run"), str(golden)]) == 0
    assert capsys.readouterr().out == "verify: OK\n"


@pytest.mark.parametrize("summary", ["{}", "[1]", '{"metrics": 3}'])
def test_verify_names_a_summary_without_metrics(tmp_path, capsys, summary):
    (tmp_path / "summary.json").write_text(summary)
    (tmp_path / "g.json").write_text('{"metrics": {}}')
    assert main(["verify", str(tmp_path), str(tmp_path / "g.json")]) == 1
    err = capsys.readouterr().err
    assert "summary.json has no 'metrics' object: is" in err and "Traceback" not in err


def _checkpoint(path, model, **extra):
    """A minimal checkpoint as load_checkpoint accepts it, holding ``model`` as the state dict."""
    import torch

    from stagewise.engine.checkpoint import FORMAT

    torch.save({"format": FORMAT, "model": model, "recipe": {"model": {"use": "x.net"}},
                "model_options": {"width": 2}, "stage_name": "phase9", **extra}, path)
    return path


def test_export_converts_floats_to_float32_and_keeps_integers(tmp_path, capsys):
    import torch

    ckpt = _checkpoint(tmp_path / "c.pt", {"w": torch.tensor([[1.5, -2.0]], dtype=torch.bfloat16),
                                           "steps": torch.tensor(7)})
    assert main(["export", str(ckpt), str(tmp_path / "m.npz")]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'm.npz'}: 2 arrays, 3 values\n"  # 2 + 1 values
    arrays, meta = load_npz(tmp_path / "m.npz")
    assert arrays["w"].dtype == np.float32 and arrays["w"].tolist() == [[1.5, -2.0]]  # numpy has no bfloat16
    assert arrays["steps"].dtype == np.int64 and int(arrays["steps"]) == 7
    assert meta == {"model": "x.net", "model_options": {"width": 2}, "stage": "phase9", "routers": {},
                    "format": "stagewise-npz-1"}


@pytest.mark.parametrize("done", [True, False])
def test_export_of_a_checkpoint_written_part_way_through_a_stage_says_so(tmp_path, capsys, done):
    # was: a stopped run's last.pt exported like a finished model, with nothing said
    import torch

    ckpt = _checkpoint(tmp_path / "c.pt", {"w": torch.ones(2)}, stage_done=done)
    assert main(["export", str(ckpt), str(tmp_path / "m.npz")]) == 0
    out, err = capsys.readouterr()
    assert out == f"wrote {tmp_path / 'm.npz'}: 1 arrays, 2 values\n"
    assert err == ("" if done else f"stagewise: note: {ckpt} was written part-way through stage 'phase9', so these "
                   f"are its weights at that point; no stage has finished yet: resume the run (stagewise run RECIPE "
                   f"--resume RUN_DIR) to train it further\n")
    assert load_npz(tmp_path / "m.npz")[1]["stage_done"] is done


def test_export_of_a_part_way_checkpoint_names_the_finished_stages_checkpoints_beside_it(tmp_path, capsys):
    # was: "export checkpoints/<stage>.pt for a finished stage's", also when no stage had finished
    import torch

    last = _checkpoint(tmp_path / "last.pt", {"w": torch.ones(2)}, stage_done=False)
    _checkpoint(tmp_path / "phase1.pt", {"w": torch.ones(2)}, stage_done=True)
    assert main(["export", str(last), str(tmp_path / "m.npz")]) == 0
    assert capsys.readouterr().err.endswith(f"; export one of phase1.pt in {tmp_path} for a finished stage's\n")


def test_export_says_when_it_replaces_an_earlier_export(tmp_path, capsys):
    # was: "wrote m.npz" whether or not an earlier export was overwritten
    import torch

    ckpt = _checkpoint(tmp_path / "c.pt", {"w": torch.ones(2)})
    for said in ("wrote", "replaced the earlier export"):
        assert main(["export", str(ckpt), str(tmp_path / "m.npz")]) == 0
        assert capsys.readouterr().out == f"{said} {tmp_path / 'm.npz'}: 1 arrays, 2 values\n"


def test_export_of_an_export_or_a_folder_without_last_pt_says_what_to_give(tmp_path, capsys):
    # was: "the checkpoint is corrupt or truncated ... copy ... over checkpoints/last.pt" for an .npz, and
    # "RUN/checkpoints/checkpoints/last.pt: checkpoint not found" for a run's checkpoints folder
    import torch

    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    _checkpoint(folder / "phase1.pt", {"w": torch.ones(2)})
    assert main(["export", str(folder / "phase1.pt"), str(tmp_path / "m.npz")]) == 0
    capsys.readouterr()
    cases = [(tmp_path / "m.npz", f"{tmp_path / 'm.npz'}: an export (.npz), not a checkpoint; give the run directory"),
             (folder, f"{folder / 'checkpoints' / 'last.pt'}: checkpoint not found; give one of the checkpoint files "
                      f"in {folder}: phase1.pt"),
             (tmp_path / "run", f"{folder / 'last.pt'}: checkpoint not found; give one of the checkpoint files in "
                                f"{folder}: phase1.pt"),
             (tmp_path, f"{tmp_path / 'checkpoints' / 'last.pt'}: checkpoint not found: {tmp_path} is no run "
                        "directory")]
    for source, error in cases:
        assert main(["export", str(source), str(tmp_path / "x.npz")]) == 1
        assert capsys.readouterr().err.startswith(f"stagewise: error: {error}")
    assert not (tmp_path / "x.npz").exists()


def test_export_of_a_misspelt_checkpoint_names_the_files_beside_it(tmp_path, capsys):
    import torch

    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    _checkpoint(folder / "phase1.pt", {"w": torch.ones(2)})
    assert main(["export", str(folder / "phase2.pt"), str(tmp_path / "x.npz")]) == 1
    assert capsys.readouterr().err == (f"stagewise: error: {folder / 'phase2.pt'}: checkpoint not found; give one of "
                                       f"the checkpoint files in {folder}: phase1.pt\n")


def test_a_damaged_checkpoint_read_for_export_gives_advice_for_export_not_for_resume(tmp_path, capsys):
    # was: "To resume a run from the end of an earlier stage, copy that stage's checkpoint ... over last.pt"
    (tmp_path / "c.pt").write_bytes(b"garbage")
    assert main(["export", str(tmp_path / "c.pt"), str(tmp_path / "m.npz")]) == 1
    assert capsys.readouterr().err.endswith("Use another checkpoint of the run (checkpoints/<stage>.pt, one per "
                                            "finished stage), or run the recipe again.\n")


def test_export_writes_the_routers_the_run_kept_so_numpy_routes_as_torch_did(tmp_path):
    # was: the export held no router: its options and calibrated threshold were lost
    import torch

    from stagewise.export import export_npz

    threshold = 0.5 + 1e-12  # torch compares float32 scores with it in float32, where it is 0.5
    routers = {"gate": {"use": "x.gate", "options": {"hard_ratio": 0.25},
                        "state": {"threshold": threshold, "steps": 3, "quantiles": torch.tensor([0.1, 0.3]),
                                  "measure": "max_prob", "fitted": True}}}
    ckpt = _checkpoint(tmp_path / "c.pt", {"w": torch.zeros(1)}, routers=routers)
    export_npz(ckpt, tmp_path / "m.npz")
    _, meta = load_npz(tmp_path / "m.npz")
    assert meta["routers"] == {"gate": {"use": "x.gate", "options": {"hard_ratio": 0.25},
                                        "state": {"threshold": 0.5, "steps": 3, "fitted": True, "measure": "max_prob",
                                                  "quantiles": [float(np.float32(0.1)), float(np.float32(0.3))]}}}
    scores = torch.tensor([0.5, np.nextafter(np.float32(0.5), 1)], dtype=torch.float32)
    stored = meta["routers"]["gate"]["state"]["threshold"]
    assert (scores >= threshold).tolist() == [True, True]
    assert (scores.numpy() >= np.float64(stored)).tolist() == [True, True]  # unrounded: [False, True]


def test_export_refuses_a_parameter_named_like_the_metadata(tmp_path, capsys):
    import torch

    ckpt = _checkpoint(tmp_path / "c.pt", {"__meta__": torch.zeros(1)})
    assert main(["export", str(ckpt), str(tmp_path / "m.npz")]) == 1
    assert "a parameter is named '__meta__', which the format reserves" in capsys.readouterr().err
    assert not (tmp_path / "m.npz").exists()


def test_export_refuses_a_parameter_named_like_the_artifacts_arrays(tmp_path, capsys):
    import torch

    ckpt = _checkpoint(tmp_path / "c.pt", {"artifacts/x": torch.zeros(1)}, artifacts={})
    assert main(["export", str(ckpt), str(tmp_path / "m.npz")]) == 1
    assert "a parameter is named 'artifacts/x', which the format reserves" in capsys.readouterr().err


def test_export_to_a_folder_names_the_file_to_give(tmp_path, capsys):
    import torch

    ckpt = _checkpoint(tmp_path / "c.pt", {"w": torch.zeros(1)})
    (tmp_path / "models").mkdir()
    assert main(["export", str(ckpt), str(tmp_path / "models")]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'models'} is a folder; give the file to write, e.g. {tmp_path / 'models' / 'model.npz'}" in err
    assert list((tmp_path / "models").iterdir()) == []


def _fake_run_recipe(recipe, out, quiet=False, resume=None):
    """Stands in for a run: a summary whose metrics tell the recipes apart."""
    out.mkdir(parents=True)
    metrics = {"val/loss": 2.0 if recipe.run.name == "tiny" else 1.5, "note": "text",
               "train/stopped_early": recipe.run.name == "tiny"}
    if recipe.run.name != "tiny":
        metrics["test/acc"] = 0.25
    (out / "summary.json").write_text(json.dumps({"metrics": metrics}))
    (out / "metrics.jsonl").write_text("")  # no epochs: no curve for compare.png
    return out


def test_compare_writes_compare_json_and_one_table(tiny_recipe_path, tmp_path, monkeypatch, capsys):
    from stagewise.compare import compare_recipes

    monkeypatch.setattr("stagewise.engine.runner.run_recipe", _fake_run_recipe)
    other = tmp_path / "other.toml"
    other.write_text(tiny_recipe_path.read_text().replace('name = "tiny"', 'name = "other"'))
    out = tmp_path / "cmp"
    compare_recipes([str(tiny_recipe_path), str(other)], [], out, quiet=True)
    saved = json.loads((out / "compare.json").read_text())["runs"]
    assert list(saved) == ["tiny", "other"] and saved["other"]["run_dir"] == str(out / "other")
    assert saved["tiny"]["metrics"] == {"val/loss": 2.0, "note": "text", "train/stopped_early": True}
    *lines, blank, written = capsys.readouterr().out.splitlines()
    assert [line.split() for line in lines] == [["metric", "tiny", "other", "other", "vs", "tiny"],
                                                ["val/loss", "2", "1.5", "-25.00%"],  # against the first
                                                ["train/stopped_early", "True", "False", "-"],  # was 1 and 0
                                                ["test/acc", "-", "0.25", "-"]]  # text metrics left out
    assert len({len(line) for line in lines}) == 1  # columns line up
    assert (blank, written) == ("", f"-> {out / 'compare.json'}")  # where the table went


def test_compare_shows_a_nan_or_inf_metric_not_a_dash(tiny_recipe_path, tmp_path, monkeypatch, capsys):
    # was a ValueError once every run had finished: summary.json holds a NaN as "nan", which the table formatted
    from stagewise.compare import compare_recipes
    from stagewise.engine.rundir import write_json_atomic

    def run(recipe, out, quiet=False, resume=None):
        out.mkdir(parents=True)
        diverged = recipe.run.name == "other"
        write_json_atomic(out / "summary.json", {"metrics": {"val/loss": float("nan") if diverged else 2.0,
                                                             "mine/threshold": float("inf") if diverged else 0.5}})
        (out / "metrics.jsonl").write_text("")  # no epochs: no curve for compare.png
        return out

    monkeypatch.setattr("stagewise.engine.runner.run_recipe", run)
    other = tmp_path / "other.toml"
    other.write_text(tiny_recipe_path.read_text().replace('name = "tiny"', 'name = "other"'))
    compare_recipes([str(tiny_recipe_path), str(other)], [], tmp_path / "cmp", quiet=True)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split() for line in lines[1:3]] == [["val/loss", "2", "nan", "-"],
                                                     ["mine/threshold", "0.5", "inf", "-"]]


def test_compare_refuses_a_repeated_run_name_or_a_used_folder_before_running(tiny_recipe_path, tmp_path,
                                                                             monkeypatch):
    from stagewise.compare import compare_recipes
    from stagewise.errors import CheckpointError, ConfigError

    ran = []
    monkeypatch.setattr("stagewise.engine.runner.run_recipe", lambda *a, **k: ran.append(a))
    with pytest.raises(ConfigError, match="run.name 'tiny' is used twice"):  # both would share one folder
        compare_recipes([str(tiny_recipe_path), str(tiny_recipe_path)], [], tmp_path / "cmp", quiet=True)
    other = tmp_path / "other.toml"
    other.write_text(tiny_recipe_path.read_text().replace('name = "tiny"', 'name = "other"'))
    (tmp_path / "cmp" / "other").mkdir(parents=True)
    (tmp_path / "cmp" / "other" / "old.txt").write_text("kept")
    with pytest.raises(CheckpointError, match="other is not empty"):  # the second run's folder: before the first runs
        compare_recipes([str(tiny_recipe_path), str(other)], [], tmp_path / "cmp", quiet=True)
    assert ran == [] and not (tmp_path / "cmp" / "tiny").exists()


@pytest.mark.parametrize("names, problem", [
    # were run one after the other: where case (macOS, Windows) or Unicode normalisation (macOS) is ignored, the
    # second run found the first's folder, full of its files and checkpoints, after the first had trained
    (["Tiny", "tiny"], "run.name 'Tiny' ({0}) and 'tiny' ({1}), the runs' folders in OUT, differ only in case, so "
                       "they are one folder where case is ignored (macOS, Windows); rename one in its recipe file (a "
                       "--set of run.name applies to every recipe compared)"),
    (["caf\u00e9", "cafe\u0301"], "run.name 'caf\u00e9' ({0}) and 'cafe\u0301' ({1}), the runs' folders in OUT, are "
                                  "one name in two Unicode normalisations (NFC and NFD), so they are one folder on "
                                  "macOS; rename one"),
    (["a", "b", "b"], "{2}: run.name 'b' is used twice; names must differ"),  # was compared with the first only
    (["a", "Compare.JSON"], "{1}: run.name 'Compare.JSON' is the name of the table compare writes in OUT; rename "
                            "the run in its recipe file"),  # was a folder that compare.json could not replace
    (["a", ".b.tmp"], "{1}: run.name '.b.tmp' is the name of a temp file of an interrupted write, which compare "
                      "--resume deletes in OUT"),
    (["a", "Compare.PNG"], "{1}: run.name 'Compare.PNG' is the name of the figure compare draws in OUT; rename "
                           "the run in its recipe file"),
], ids=["case", "normalisation", "third-repeats-second", "compare-json", "temp-file", "compare-png"])
def test_compare_refuses_run_names_that_share_a_folder_before_running(tiny_recipe_path, tmp_path, monkeypatch, names,
                                                                      problem):
    from stagewise.compare import compare_recipes
    from stagewise.errors import ConfigError

    ran = []
    monkeypatch.setattr("stagewise.engine.runner.run_recipe", lambda *a, **k: ran.append(a))
    paths = [tmp_path / f"{i}.toml" for i in range(len(names))]
    for path, name in zip(paths, names, strict=True):
        path.write_text(tiny_recipe_path.read_text().replace('name = "tiny"', f'name = "{name}"'))
    with pytest.raises(ConfigError) as info:
        compare_recipes([str(p) for p in paths], [], tmp_path / "cmp", quiet=True)
    (found,) = info.value.problems
    assert found.startswith(problem.format(*paths))
    assert ran == [] and not (tmp_path / "cmp").exists()


def test_compare_without_out_never_reuses_a_folder(tiny_recipe_path, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr("stagewise.compare.compare_recipes", lambda *args, **kwargs: seen.append(args[2]))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "compare").mkdir(parents=True)
    (tmp_path / "runs" / "compare" / "compare.json").write_text("{}")  # an earlier comparison
    assert main(["compare", str(tiny_recipe_path)]) == 0
    assert [str(p) for p in seen] == ["runs/compare-2"]


# --- fuzzing findings: what users feed the commands besides --set keys --------------------------------


@pytest.mark.parametrize("raw, problem", [
    # a Latin-1 or UTF-16 recipe, or a binary file, was a UnicodeDecodeError traceback; deep nesting a RecursionError
    (b'[run]\nname = "x"\n# caf\xe9\n', "not UTF-8 text: byte 0xe9 at line 3 cannot be read (TOML files are UTF-8); "
                                        "save the file as UTF-8"),
    ('[run]\nname = "x"\n'.encode("utf-16"), "not UTF-8 text: byte 0xff at line 1"),
    (b"a = " + b"[" * 5000 + b"]" * 5000, "not valid TOML: arrays or tables nested too deeply to read"),
    (b'[run]\nseed = = 7\n', "not valid TOML: Invalid value (at line 2, column 8)"),  # pinned: the line
], ids=["latin-1", "utf-16", "nested-5000-deep", "syntax-error"])
def test_a_recipe_file_that_cannot_be_read_is_one_message(tmp_path, capsys, raw, problem):
    (tmp_path / "r.toml").write_bytes(raw)
    assert main(["run", str(tmp_path / "r.toml"), "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"stagewise: error: {tmp_path / 'r.toml'}: 1 problem:\n  - {problem}")
    assert err.count("\n") == 2  # one problem, one message
    assert not (tmp_path / "run").exists()


def test_a_recipe_with_a_byte_order_mark_loads_and_a_folder_is_not_a_recipe(tiny_recipe_path, tmp_path, capsys):
    from stagewise.recipe import load_recipe

    (tmp_path / "bom.toml").write_bytes(b"\xef\xbb\xbf" + tiny_recipe_path.read_bytes())  # as Notepad saves
    assert load_recipe(tmp_path / "bom.toml").run.name == "tiny"  # was "Invalid statement (at line 1, column 1)"
    (tmp_path / "recipes").mkdir()
    assert main(["run", str(tmp_path / "recipes")]) == 1
    err = capsys.readouterr().err
    assert "recipes: 1 problem:\n  - a directory, not a recipe file: give the recipe's .toml file" in err


def test_out_and_resume_exclude_each_other(tiny_recipe_path, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:  # --out was silently ignored: the run went on in RUN_DIR
        main(["run", str(tiny_recipe_path), "--resume", str(tmp_path / "a"), "--out", str(tmp_path / "b")])
    assert info.value.code == 2
    assert "argument --out: not allowed with argument --resume" in capsys.readouterr().err


@pytest.mark.parametrize("args, argument", [
    (["run", "RECIPE", "--resume", ""], "--resume"), (["run", "RECIPE", "--out", " "], "--out"),
    (["compare", "RECIPE", "--out", ""], "--out"), (["export", "RUN", ""], "out"),
], ids=["run-resume", "run-out", "compare-out", "export-out"])
def test_an_empty_path_is_refused_before_anything_runs(tiny_recipe_path, tmp_path, capsys, monkeypatch, args,
                                                       argument):
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # --resume "" started a new run in runs/tiny; --out "" wrote there too
    args = [str(tiny_recipe_path) if a == "RECIPE" else str(tmp_path) if a == "RUN" else a for a in args]
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    assert f"argument {argument}: an empty path; give a folder or file name" in capsys.readouterr().err
    assert list((tmp_path / "cwd").iterdir()) == []


def test_run_recipe_refuses_out_and_resume_together(tiny, tmp_path):
    with pytest.raises(ValueError, match=r"give out or resume, not both"):  # out was silently ignored
        run_recipe(tiny(), out=tmp_path / "b", resume=tmp_path / "a", quiet=True)
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.toml"]


@pytest.mark.parametrize("command", ["run", "compare"])
def test_out_running_into_a_file_is_refused_and_writes_nothing(tiny_recipe_path, tmp_path, capsys, command):
    (tmp_path / "notes.txt").write_text("kept")  # was a NotADirectoryError traceback
    out = tmp_path / "notes.txt" / "sub"
    assert main([command, str(tiny_recipe_path), "--out", str(out), "--quiet"]) == 1
    blocked = out if command == "run" else out / "tiny"  # compare's --out is the runs' parent folder
    assert capsys.readouterr().err == (f"stagewise: error: {blocked} cannot be created: {tmp_path / 'notes.txt'} is a "
                                       f"file, not a folder; pass --out with a path in a folder\n")
    assert (tmp_path / "notes.txt").read_text() == "kept"


@pytest.mark.parametrize("error, message", [
    (PermissionError(13, "Permission denied", "/data/runs/x"),
     "/data/runs/x: Permission denied; check its permissions, or choose another folder"),
    (OSError(28, "No space left on device", "/data/runs/x/checkpoints/last.pt"),
     "/data/runs/x/checkpoints/last.pt: No space left on device; free some disk space and run again"),
], ids=["read-only", "disk-full"])
def test_a_file_system_error_is_one_message_naming_the_path(capsys, error, message):
    from stagewise import plugins

    def refused(args):  # e.g. a read-only output folder: was a PermissionError traceback
        raise error

    _with_command(refused)
    try:
        assert main(["boom"]) == 1
    finally:
        plugins.unregister_plugin("boom")
    assert capsys.readouterr().err == f"stagewise: error: {message}\n"


@pytest.mark.parametrize("golden, expected", [
    ('{"metrics": ' + "[" * 100_000 + "]" * 100_000 + "}", "1 problem:\n  - cannot be read as JSON: nested too deeply"),
    ('{"metrics": {"a": 1' + "0" * 400 + "}}", "verify: 1 difference(s)"),  # compared as inf, not OverflowError
], ids=["nested-100000-deep", "int-beyond-float"])
def test_verify_reads_any_golden_file_without_a_traceback(tmp_path, capsys, golden, expected):
    run_dir = _fake_run(tmp_path, {"a": 1.0})
    (tmp_path / "g.json").write_text(golden)
    assert main(["verify", str(run_dir), str(tmp_path / "g.json")]) == 1
    captured = capsys.readouterr()
    assert expected in captured.out + captured.err and "Traceback" not in captured.err


def test_export_never_overwrites_a_file_it_did_not_write(tmp_path, capsys):
    import torch

    ckpt = _checkpoint(tmp_path / "c.pt", {"w": torch.zeros(1)})
    original = ckpt.read_bytes()
    (tmp_path / "notes.txt").write_text("kept")
    for target in (ckpt, tmp_path / "notes.txt"):  # the checkpoint itself was replaced by the .npz
        assert main(["export", str(ckpt), str(target)]) == 1
        assert (f"stagewise: error: {target} exists and is not a stagewise export; export never overwrites other "
                f"files: give a new file name") in capsys.readouterr().err
    assert ckpt.read_bytes() == original and (tmp_path / "notes.txt").read_text() == "kept"
    assert main(["export", str(ckpt), str(tmp_path / "m.txt")]) == 1  # was written: an .npz named m.txt
    assert (f"stagewise: error: {tmp_path / 'm.txt'}: an export is an .npz file; give a name ending in .npz, "
            f"e.g. {tmp_path / 'm.npz'}") in capsys.readouterr().err and not (tmp_path / "m.txt").exists()
    assert main(["export", str(ckpt), str(tmp_path / "m.npz")]) == 0
    assert main(["export", str(ckpt), str(tmp_path / "m.npz")]) == 0  # an earlier export may be replaced
    assert main(["export", str(ckpt), str(tmp_path / "new" / "m.npz")]) == 0  # a missing folder is made, as --out's
    assert main(["export", str(ckpt), str(tmp_path / "notes.txt" / "m.npz")]) == 1  # was FileExistsError
    assert (f"cannot write {tmp_path / 'notes.txt' / 'm.npz'}: {tmp_path / 'notes.txt'} is a file, not a folder"
            in capsys.readouterr().err)


def test_export_refuses_a_checkpoint_that_needs_pickle_without_running_it(tmp_path, capsys):
    import torch

    from stagewise.engine.checkpoint import FORMAT

    torch.save({"format": FORMAT, "model": RunsCode(tmp_path / "ran")}, tmp_path / "evil.pt")
    assert main(["export", str(tmp_path / "evil.pt"), str(tmp_path / "m.npz")]) == 1
    err = capsys.readouterr().err
    assert not (tmp_path / "ran").exists() and not (tmp_path / "m.npz").exists()
    # torch's own text is pages long, with ANSI codes, and tells to load with weights_only=False
    assert err.count("\n") == 1 and "weights_only=False" not in err and "\x1b" not in err
    assert err.startswith(f"stagewise: error: {tmp_path / 'evil.pt'}: refused: the file holds Python objects (it "
                          f"refers to posix.system) that only an unsafe load (pickle) could read")


def test_export_names_what_an_incomplete_checkpoint_lacks(tmp_path, capsys):
    import torch

    from stagewise.engine.checkpoint import FORMAT

    torch.save({"format": FORMAT, "model": {}}, tmp_path / "c.pt")  # was KeyError: 'recipe'
    assert main(["export", str(tmp_path / "c.pt"), str(tmp_path / "m.npz")]) == 1
    assert capsys.readouterr().err == (f"stagewise: error: {tmp_path / 'c.pt'}: an incomplete stagewise checkpoint: "
                                       f"it lacks recipe, model_options, stage_name; use a checkpoint a stagewise "
                                       f"run wrote\n")



class _Ended(Exception):
    """os._exit, caught: the test process goes on."""


@pytest.mark.parametrize("joined", [True, False])
def test_a_torchrun_process_whose_run_joined_the_group_ends_without_python_shutdown(joined, monkeypatch, capsys):
    # torch's gloo threads outlive the group; one releasing a tensor during shutdown aborted finished jobs
    from stagewise.engine import distributed

    ended = []

    def exit_now(code: int) -> None:
        ended.append((code, capsys.readouterr().out))  # what the process had shown when it ended
        raise _Ended

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(distributed, "_joined", joined)
    monkeypatch.setattr(os, "_exit", exit_now)
    if joined:
        with pytest.raises(_Ended):
            main(["recipes"])
        assert len(ended) == 1 and ended[0][0] == 0 and "stagewise.demo" in ended[0][1]
    else:
        assert main(["recipes"]) == 0 and ended == []


def test_the_comparison_table_shows_each_run_against_the_first_and_lines_up_long_names():
    # was: no change column (a reader divided by hand), and a name over 15 characters pushed its column out of line
    from stagewise.compare import comparison_table

    runs = {"baseline": {"metrics": {"val/ppl": 120.0, "err": 0.0, "n": 3, "nan": float("nan")}},
            "hybrid_with_a_long_name": {"metrics": {"val/ppl": 121.2, "err": 0.5, "n": 3, "nan": 1.0}},
            "third": {"metrics": {"val/ppl": 90.0}}}
    lines = comparison_table(runs).splitlines()
    assert [line.split() for line in lines] == [
        ["metric", "baseline", "hybrid_with_a_long_name", "third", "hybrid_with_a_long_name", "vs", "baseline",
         "third", "vs", "baseline"],
        ["val/ppl", "120", "121.2", "90", "+1.00%", "-25.00%"],
        ["err", "0", "0.5", "-", "-", "-"],  # no change from 0
        ["n", "3", "3", "-", "+0.00%", "-"],
        ["nan", "nan", "1", "-", "-", "-"]]
    assert len({len(line) for line in lines}) == 1


def test_a_golden_file_whose_tolerance_is_not_an_object_is_refused(tmp_path):
    from stagewise.verify import golden_tables

    with pytest.raises(stagewise.ConfigError, match="'tolerance' must be an object of metric names and numbers >= 0"):
        golden_tables({"metrics": {"a": 1.0}, "tolerance": 0.1}, tmp_path / "g.json")


def test_compare_resume_refuses_a_run_folder_without_its_recipe(tiny_recipe_path, tmp_path):
    from stagewise.compare import compare_recipes

    (tmp_path / "cmp" / "tiny").mkdir(parents=True)
    (tmp_path / "cmp" / "tiny" / "notes.txt").write_text("mine")
    with pytest.raises(stagewise.CheckpointError) as info:
        compare_recipes([str(tiny_recipe_path)], [], tmp_path / "cmp", quiet=True, resume=True)
    assert str(info.value) == (f"--resume {tmp_path / 'cmp'}: {tmp_path / 'cmp' / 'tiny'} holds files but no "
                               f"recipe.toml, so it is not a run of 'tiny'; move it away, or pass --out with a new "
                               f"folder")


def test_a_process_stopped_by_another_s_failure_still_says_its_own_error_in_one_line(monkeypatch, capsys):
    # a torchrun process whose collective broke off says so in one line; was: without its own error, so a bug of
    # its own that came after another process's failure was printed by nobody
    from stagewise.cli import main as cli

    def broken_off(argv):
        raise RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer\nmore of torch's text")

    monkeypatch.setattr(cli, "_command", broken_off)
    monkeypatch.setattr(cli, "_follows_another_process", lambda exc: True)
    assert cli.main(["run", "recipe.toml"]) == 1
    assert capsys.readouterr().err == (
        "stagewise: error: stopped, as another process of this torchrun job failed (see its error); here: "
        "RuntimeError: [../gloo/transport/tcp/pair.cc:534] Connection closed by peer\n")
