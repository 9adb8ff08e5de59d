"""The command line in-process: contracts other tools rely on, and errors as messages."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import read_summary

from stagewise import __version__
from stagewise.cli.main import main
from stagewise.engine.checkpoint import load_checkpoint
from stagewise.export import load_npz


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


def test_errors_are_one_message_and_exit_1(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[model]\nuse = "stagewise.transformer"\n[[stages]]\nname = "a"\nlr = "fast"\n')
    assert main(["run", str(bad), "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"stagewise: error: {bad}: 1 problem:") and "stages[0].lr: expected float" in err
    assert not (tmp_path / "run").exists()  # nothing written


def test_bad_data_path_writes_nothing(tiny_recipe_path, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", str(tiny_recipe_path), "--out", str(out), "--set", f"data.path={tmp_path / 'missing'}"])
    assert code == 1 and "missing" in capsys.readouterr().err and not out.exists()


def test_verify_needs_a_finished_run(tmp_path, capsys):
    (tmp_path / "g.json").write_text('{"metrics": {}}')
    assert main(["verify", str(tmp_path), str(tmp_path / "g.json")]) == 1
    assert "did the run finish?" in capsys.readouterr().err


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


def test_compare_refuses_other_seeds_and_other_data(tiny_recipe_path, tmp_path):
    from stagewise.compare import compare_recipes
    from stagewise.errors import ConfigError

    text = tiny_recipe_path.read_text().replace('name = "tiny"', 'name = "other"')
    for change, problem in [(("seed = 7", "seed = 8"), "run.seed 8 differs from 7"),
                            (("seq_len = 8", "seq_len = 4"), "[data] differs from")]:
        other = tmp_path / "other.toml"
        other.write_text(text.replace(*change))
        with pytest.raises(ConfigError) as info:
            compare_recipes([str(tiny_recipe_path), str(other)], [], tmp_path / "cmp", quiet=True)
        (found,) = info.value.problems
        assert found.startswith(f"{other}: ") and problem in found
        assert not (tmp_path / "cmp").exists()  # refused before any run
