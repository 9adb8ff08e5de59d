"""ASHEM against its baseline on real text, on the same data and seed.

    python packages/stagewise-lego-ashem/bench/ashem_vs_baseline.py [--data DIR] [--out DIR] [--json OUT.json]
        [--quick] [--threads N] [--jobs N] [--set KEY=VALUE ...]

DIR holds train.txt, valid.txt and test.txt (WikiText-style plain text, UTF-8). Default: a
deterministic split of ../shared/data/pd_english written to ``<out>/data``: every file
cut into 40-line chunks, chunk i (0-based, over the sorted files) to valid when i % 10 == 2, to
test when i % 10 == 6, else to train, each split's chunks in one seeded random order (so valid,
on which the router is calibrated, and test, on which it is evaluated, are drawn alike and
share no text). Every run directory is kept under ``--out`` (default runs/lego-ashem-bench, or
runs/lego-ashem-bench-2, ... when that holds files; a folder given must be new or empty), so a
finished run survives a later one that fails. Runs the recipes lego_ashem.baseline and
lego_ashem.ashem with the same [data] table and seed (ashem with hard_ratio 0.4, and with the
learned exit probe trained and evaluated after its max-softmax test: probe_<metric>), side by
side where two cores are free (``--jobs``: the baseline trains on one core while ashem trains
and is timed on the other; ``--jobs 1`` runs them one after the other, so ashem is timed
alone), then a speed-only measurement (random weights, labelled so) on a shape where the
layers dominate: dim 256, 8 layers, exit 4, vocabulary 2048, 70% of tokens exiting. Prints a
table and one JSON line.
Wall-clock numbers are measurements on a shared machine; counted FLOPs are printed beside them.
``--set`` overrides the runs' recipes after the script's own settings (e.g. ``--set model.n_embd=128``);
the result lists them under ``overrides``, so a changed benchmark is never read as the default one.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import torch

from stagewise.bench import add_jobs_option, add_set_option, run_benchmark, run_recipes
from stagewise.compare import check_comparable, overrides_by_recipe
from stagewise.data.text import write_file_split
from stagewise.nn.transformer import TransformerConfig
from stagewise.recipe import Recipe, load_recipe, recipe_from_table
from stagewise_lego_ashem import metrics
from stagewise_lego_ashem.evaluation import eval_speedup
from stagewise_lego_ashem.model import DeepSupervisionTransformer
from stagewise_lego_ashem.router import Confidence, ConfidenceOptions

DEFAULT_SOURCE = Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "pd_english"
CONTRACT = ("baseline_ppl", "full_depth_ppl", "routed_ppl", "shallow_ratio", "compute_cost", "compute_cost_flops",
            "speedup_measured", "batch_size", "hard_ppl_before", "hard_ppl_after", "phase2_cache_speedup",
            "phase2_cache_speedup_flops", "phase2_token_mode_speedup")
# the same routed evaluation with the learned exit probe, reported as probe_<metric>
PROBE_METRICS = ("routed_ppl", "acc", "shallow_ratio", "compute_cost", "compute_cost_flops", "speedup_measured",
                 "hard_ppl_before", "hard_ppl_after", "threshold", "routed_ms", "full_depth_ms")
HARD_RATIO = 0.4  # the ashem recipe's router: fraction of valid tokens calibrated hard
CHUNK_LINES = 40  # lines per chunk of the default split (a few paragraphs)


def default_split(out: Path) -> Path:
    """train/valid/test.txt from ../shared/data/pd_english, dealt by 40-line chunk.

    Chunk i (0-based, over the sorted files) goes to valid when i % 10 == 2, to test when
    i % 10 == 6, else to train; each split's chunks in one seeded random order (core's
    ``write_file_split``). A by-file split would calibrate the router on one kind of text and
    evaluate it on another (at 150k tokens: valid = poems and speeches, test = Moby-Dick), and a
    threshold calibrated on one split would not give the same hard ratio on the other. Nine of the
    files are not UTF-8 (Latin-1 bytes): their few such bytes are read as U+FFFD, as when the
    recorded results were measured.
    """
    write_file_split(DEFAULT_SOURCE.resolve(), out, valid=2, test=6, chunk_lines=CHUNK_LINES, seed=0,
                     errors="replace")
    return out


def settings(data: Path, quick: bool, threads: int) -> list[str]:
    """--set overrides shared by both recipes (same [data] table and seed), then per recipe."""
    common = [f"data.path={data}", f"run.threads={threads}"]
    # quick: 150k tokens per split (the seed trained on 330k) and a 4k vocabulary
    return common + (["data.max_tokens=150000", "data.max_vocab=4000"] if quick else ["data.max_vocab=8000"])


def epochs(quick: bool) -> dict[str, list[str]]:
    p1, p2 = (4, 4) if quick else (20, 20)
    # 15 interleaved timing rounds (the stage's default is 5): a steadier median on a shared machine
    curve = ["stages.test.speed_repeats=15"] + (["stages.test.curve_points=6"] if quick else [])
    # hard_ratio 0.4: the router is calibrated so that 60% of valid exits; valid and test are
    # drawn alike, so about 60% of test exits too, and shallow_ratio >= 0.5 is tested with a
    # margin (at 0.5 it would be a coin toss around 0.5 by construction)
    return {"ashem": [f"stages.phase1.max_epochs={p1}", f"stages.phase2.max_epochs={p2}",
                      f"stages.mine.router.hard_ratio={HARD_RATIO}", *curve],
            "baseline": [f"stages.train.max_epochs={p1 + p2}"]}


def with_probe(recipe: Recipe, curve: list[str]) -> Recipe:
    """The ashem recipe plus, after its max-softmax test, the learned exit probe (CALM/LayerSkip):
    ``probe`` (lego_ashem.train_exit_probe: fit on train, threshold calibrated on valid at the same
    hard_ratio) and ``test_probe`` (the same routed evaluation of test, routed by the probe).
    Phases 1 and 2 are unchanged: the probe is one more linear layer that no loss reaches
    before its own stage, so the max-softmax ``test`` numbers are those of the plain recipe."""
    table = copy.deepcopy(recipe.table)
    table["model"]["exit_probe"] = True
    table["stages"] += [{"name": "probe", "use": "lego_ashem.train_exit_probe"},
                        {"name": "test_probe", "use": "lego_ashem.evaluate_routed", "split": "test"}]
    return recipe_from_table(table, f"{recipe.source}+probe",
                             [c.replace("stages.test.", "stages.test_probe.") for c in curve])


def run_both(data: Path, quick: bool, threads: int, out: Path, overrides: list[str], jobs: int) -> dict[str, dict]:
    """Both recipes with the script's settings, then ``overrides`` (--set) as compare shares them out;
    ``jobs`` at a time (core's ``run_recipes``)."""
    common, per, names = settings(data, quick, threads), epochs(quick), ("baseline", "ashem")
    shares = dict(zip(names, overrides_by_recipe([f"lego_ashem.{name}" for name in names], overrides), strict=True))
    recipes = {name: load_recipe(f"lego_ashem.{name}", common + per[name] + shares[name]) for name in names}
    recipes["ashem"] = with_probe(recipes["ashem"], [c for c in per["ashem"] if c.startswith("stages.test.")])
    check_comparable(list(recipes.values()))
    finished = run_recipes({name: (recipe, out / name) for name, recipe in recipes.items()}, jobs)
    return {name: {**json.loads((run.path / "summary.json").read_text()), "wall_seconds": run.seconds}
            for name, run in finished.items()}


def large_shape_speed() -> dict[str, float]:
    """Speed only, random weights (labelled so): dim 256, 8 layers, exit 4, vocabulary 2048,
    batch 32 x 64 tokens, threshold at the 0.3 quantile (70% of the tokens exit)."""
    torch.manual_seed(0)
    config = TransformerConfig(vocab_size=2048, n_layer=8, n_embd=256, n_head=4, ffn_hidden=1024, max_seq_len=64)
    model = DeepSupervisionTransformer(config, exit_layer=4, exit_probe=True).eval()
    idx = torch.randint(0, 2048, (32, 64), generator=torch.Generator().manual_seed(1))
    out = {}
    for measure in ("max_prob", "probe"):
        router = Confidence(ConfidenceOptions(measure=measure, hard_ratio=0.3))
        with torch.no_grad():
            scores, _ = router.score(model, model.exit_hidden(idx))
            router.calibrate(scores)
            easy = router.route(scores).masks["easy"]
        shape = metrics.Shape.of(model)
        flops = metrics.routed_flops(shape, easy, measure) / metrics.full_depth_flops(shape, torch.ones_like(easy))
        speed = eval_speedup(model, router, idx, repeats=5)
        out[f"large_{measure}_compute_cost_flops"] = flops
        out[f"large_{measure}_speedup_measured"] = speed["speedup_measured"]
        out[f"large_{measure}_shallow_ratio"] = float(easy.float().mean())
    return out


def collect(summaries: dict[str, dict], large: dict[str, float], overrides: list[str], jobs: int) -> dict:
    base, ashem = summaries["baseline"]["metrics"], summaries["ashem"]["metrics"]
    result = {"baseline_ppl": base["test/ppl"]}
    result.update({k: ashem[f"test/{k}"] for k in CONTRACT if f"test/{k}" in ashem})
    result.update({k: ashem[f"phase2/{k}"] for k in CONTRACT if f"phase2/{k}" in ashem})
    result.update({"exit_ppl": ashem["test/exit_ppl"], "acc": ashem["test/acc"], "baseline_acc": base["test/acc"],
                   "threshold": ashem["test/threshold"], "mine_hard_ratio": ashem["mine/hard_ratio"],
                   "phase2_token_mode_speedup_flops": ashem["phase2/phase2_token_mode_speedup_flops"],
                   **{k: ashem[f"phase2/{k}"] for k in ("phase2_cache_step_ms", "phase2_full_forward_step_ms",
                                                         "phase2_token_step_ms", "phase2_cache_epoch_s",
                                                         "phase2_full_forward_epoch_s", "phase2_token_epoch_s")},
                   "routed_ms": ashem["test/routed_ms"], "full_depth_ms": ashem["test/full_depth_ms"],
                   "confidence_ms": ashem["test/confidence_ms"],
                   "confidence_flops_share": ashem["test/confidence_flops_share"],
                   "confidence_time_share": ashem["test/confidence_ms"] / ashem["test/routed_ms"],
                   "baseline_seconds": summaries["baseline"]["wall_seconds"],
                   "ashem_seconds": summaries["ashem"]["wall_seconds"],
                   "phase1_seconds": summaries["ashem"]["stages"]["phase1"]["seconds"],
                   "phase2_seconds": summaries["ashem"]["stages"]["phase2"]["seconds"],
                   **{f"probe_{k}": ashem[f"test_probe/{k}"] for k in PROBE_METRICS},
                   "probe_probe_acc": ashem["probe/probe_acc"], "probe_probe_loss": ashem["probe/probe_loss"],
                   "probe_agreement": ashem["probe/agreement"],
                   **large, "load_average_1min": os.getloadavg()[0], "jobs": jobs, "overrides": overrides})
    result["targets"] = {
        "routed_within_2pct_of_full_depth": result["routed_ppl"] <= 1.02 * result["full_depth_ppl"],
        "shallow_ratio_at_least_0.5": result["shallow_ratio"] >= 0.5,
        "speedup_realises_90pct_of_flops": result["speedup_measured"] >= 0.9 / result["compute_cost_flops"],
        "probe_routed_within_2pct_of_full_depth": result["probe_routed_ppl"] <= 1.02 * result["full_depth_ppl"],
        "probe_shallow_ratio_at_least_0.5": result["probe_shallow_ratio"] >= 0.5,
        "probe_speedup_realises_90pct_of_flops":
            result["probe_speedup_measured"] >= 0.9 / result["probe_compute_cost_flops"],
        "large_shape_speedup_at_least_1.2": max(large["large_max_prob_speedup_measured"],
                                                large["large_probe_speedup_measured"]) >= 1.2,
        "phase2_cache_realises_90pct": result["phase2_cache_speedup"] >= 0.9 * result["phase2_cache_speedup_flops"],
    }
    return result


def table(result: dict) -> str:
    rows = [(k, v) for k, v in result.items() if k != "targets"] + list(result["targets"].items())
    return "\n".join(f"{k:<40}{v:>14.6g}" if isinstance(v, float) else f"{k:<40}{v!s:>14}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="directory with train.txt, valid.txt, test.txt (UTF-8)")
    parser.add_argument("--out", type=Path, help="new or empty directory for the run directories (and the "
                        "dealt data); default: runs/lego-ashem-bench, or runs/lego-ashem-bench-2, ...")
    parser.add_argument("--json", type=Path, help="also write the result to this file")
    parser.add_argument("--quick", action="store_true", help="150k-token splits, 4 + 4 epochs (< 10 minutes)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core machine more threads oversubscribe)")
    add_jobs_option(parser)
    add_set_option(parser, "The probe's stages (probe, test_probe) are added after them.")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    def body(out: Path) -> dict[str, float]:
        data = args.data or default_split(out / "data")
        summaries = run_both(data, args.quick, args.threads, out, args.overrides, args.jobs)
        return collect(summaries, large_shape_speed(), args.overrides, args.jobs)

    return run_benchmark("ashem_vs_baseline", body, table, args.out, "lego-ashem-bench", args.json)


if __name__ == "__main__":
    sys.exit(main())
