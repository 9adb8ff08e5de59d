"""What the docs promise about reproducible numbers, checked with exact equality: how batches are
loaded, what else ran in the process, and how the runs of a comparison are started change no number."""

from __future__ import annotations

import math
import subprocess
import sys

import torch
from conftest import read_summary

from stagewise.compare import compare_recipes
from stagewise.engine.batches import epoch_order
from stagewise.engine.runner import run_recipe
from stagewise.recipe import load_recipe
from stagewise.testing import timeless_records

DROPOUT = "model.dropout=0.1"  # every step draws random numbers, so a moved draw shows in the numbers


def test_dataloader_workers_give_the_numbers_of_in_process_batches(tiny, tmp_path):
    # docs/recipes.md, data.num_workers: 0 loads the same batches with the same random draws as a DataLoader
    in_process = run_recipe(tiny(DROPOUT, "stages.phase2.max_epochs=1"), out=tmp_path / "w0", quiet=True)
    workers = run_recipe(tiny(DROPOUT, "stages.phase2.max_epochs=1", "data.num_workers=2"), out=tmp_path / "w2",
                         quiet=True)
    assert timeless_records(workers) == timeless_records(in_process)


def test_a_run_after_another_in_the_process_gives_a_fresh_process_s_numbers(tiny, tiny_recipe_path, tmp_path):
    # README's "same recipe, same seed: bit-identical metrics" holds for run_recipe called again in a
    # notebook or by compare: what an earlier run set (seed, threads, determinism) must not carry over
    run_recipe(tiny("run.seed=3", "run.threads=2", "run.deterministic=false", DROPOUT, "stages.phase1.max_epochs=1",
                    "stages.phase2.max_epochs=1"), out=tmp_path / "before", quiet=True)
    again = run_recipe(tiny(), out=tmp_path / "again", quiet=True)
    subprocess.run([sys.executable, "-m", "stagewise", "run", str(tiny_recipe_path), "--out", str(tmp_path / "fresh"),
                    "--quiet"], check=True, capture_output=True)
    assert timeless_records(again) == timeless_records(tmp_path / "fresh")


def test_compare_gives_each_recipe_the_numbers_of_its_own_run(tiny, tiny_recipe_path, tmp_path):
    # docs/concepts.md: compare runs both recipes in one process; each must end as a run of its own would
    other = tmp_path / "other.toml"
    other.write_text(tiny_recipe_path.read_text().replace('name = "tiny"', 'name = "other"')
                     .replace("lr = 1e-2", "lr = 3e-2"))
    compare_recipes([str(tiny_recipe_path), str(other)], [DROPOUT], tmp_path / "cmp", quiet=True)
    alone = run_recipe(load_recipe(other, [DROPOUT]), out=tmp_path / "alone", quiet=True)
    assert timeless_records(tmp_path / "cmp" / "other") == timeless_records(alone)
    assert read_summary(tmp_path / "cmp" / "other")["metrics"] == read_summary(alone)["metrics"]


def test_eval_batch_size_moves_only_the_last_digits_of_evaluated_sums(tiny, tmp_path):
    # docs/recipes.md, data.eval_batch_size: training is untouched, counts are exact, summed losses
    # differ only in their last digits (each batch sums its tokens in float32 before the float64 total)
    def metrics(run):
        return read_summary(run)["metrics"]

    default = run_recipe(tiny(), out=tmp_path / "default", quiet=True)
    ones = run_recipe(tiny("data.eval_batch_size=1"), out=tmp_path / "ones", quiet=True)
    assert [r for r in timeless_records(ones) if r["event"] == "step"] == \
           [r for r in timeless_records(default) if r["event"] == "step"]
    for key, value in metrics(default).items():
        if key.endswith(("/loss", "/ppl")) and not key.startswith("train/"):
            assert math.isclose(metrics(ones)[key], value, rel_tol=1e-6), key
        else:
            assert metrics(ones)[key] == value, key


def test_an_epoch_s_batch_order_depends_on_seed_stage_and_epoch_only():
    # docs/concepts.md: the order is drawn from (seed, stage, epoch) only, not from torch's global RNG
    order = epoch_order(50, 7, 1, 2)
    torch.manual_seed(123)
    torch.rand(10)
    assert epoch_order(50, 7, 1, 2) == order
    assert all(epoch_order(50, *other) != order for other in ((8, 1, 2), (7, 0, 2), (7, 1, 3)))
