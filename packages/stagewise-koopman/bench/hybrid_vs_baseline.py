"""Baseline vs Koopman hybrid, measured on the same data and seed.

    python packages/stagewise-koopman/bench/hybrid_vs_baseline.py [--data DIR] [--out DIR] [--json OUT.json]
                                                                  [--quick] [--seeds N] [--jobs N] [--set KEY=VALUE ...]

DIR holds train.txt, valid.txt and test.txt (UTF-8); by default the public-domain English texts in
../shared/data/pd_english (relative to the repository) are dealt to the three splits by
40-line chunk (core's write_file_split: chunk i to valid when i % 10 == 2, to test when
i % 10 == 6, each split in one seeded order), so that the three are drawn alike and share no
text, into ``<out>/data``. Every run directory is kept under ``--out`` (default
runs/koopman-bench, or runs/koopman-bench-2, ... when that holds files; a folder given must be
new or empty), so the runs that finished survive one that fails. Runs the recipes
koopman.baseline and koopman.hybrid (same [data], [model], seed and epochs), then the hybrid
again for each weight cap of the sweep (the term's weight and cap both set to it), two at a time
where two cores are free (``--jobs``; each run is single-threaded, so two on two cores train about
as fast as one alone; the baseline and the hybrid whose main stages time_ratio compares start
together, side by side; ``--jobs 1`` runs one after another, each timed alone). ``--set``
overrides the recipes after the script's settings (e.g. ``--set model.n_layer=6``); it refuses the
seed (``--seeds``) and the Koopman term's weight and cap (the sweep's). Prints a table and one JSON line:

- baseline_ppl, hybrid_ppl: final validation perplexity of each (the main stage's best epoch);
- koopman_forward_ppl: test perplexity with the last ``koopman_forward_layers`` blocks replaced
  by ψ(K^k φ(h)) (``koopman_forward_ratio``: ÷ the standard test perplexity of the same model);
- koopman_share: weighted Koopman term / total loss in the hybrid's last epoch (the engine's
  per-step mean of weight x term, ``train/koopman/weighted``, over the mean total loss);
- linearity_gain: relative lifted one-step error of Koopman modules fitted post hoc on the
  frozen baseline ÷ the same fit on the frozen hybrid;
- fallbacks: batches whose Koopman weight the engine cut over the hybrid's whole main stage
  (its last epoch's record: the final metrics are the best epoch's, which count only up to it);
- time_ratio: seconds of the hybrid's main stage ÷ the baseline's (same epochs and steps; wall
  clock, on a possibly shared machine); seconds: {baseline_main, hybrid_main}, those seconds;
- baseline_test_ppl, hybrid_test_ppl: test perplexity of each (the final ``test`` stage);
- hybrid_weight: the term's mean effective weight in the hybrid's best epoch (after fallbacks);
- mode: "quick" or "full", the settings used; jobs: runs at once; overrides: the --set overrides, if any;
- sweep: [{cap, ppl, linearity_gain}] — the trade-off between the term's weight and perplexity;
- seeds (with ``--seeds N``, N > 1): [{seed, baseline_ppl, hybrid_ppl, ppl_change_pct,
  test_ppl_change_pct, linearity_gain}] for seeds 0..N-1 (seed 0 is the run above), and
  seeds_mean (the mean change of val and test PPL and the mean gain), so a difference can be read
  against the seed-to-seed spread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stagewise.bench import add_jobs_option, add_set_option, run_benchmark, run_recipes
from stagewise.compare import overrides_by_recipe
from stagewise.data.text import write_file_split
from stagewise.errors import StagewiseError
from stagewise.recipe import Recipe, load_recipe

REPO = Path(__file__).resolve().parents[3]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "pd_english"
CAPS = (0.01, 0.05, 0.2, 0.5)
RECIPES = ("koopman.baseline", "koopman.hybrid")
SCRIPTS_OWN = ("run.seed", "stages.main.losses.koopman.weight", "stages.main.losses.koopman.cap")  # --set refused
HYBRID_CAP = 0.2  # the weight of koopman.hybrid's term: its run is the sweep's 0.2 point
# (data and training overrides) per mode. Quick: 8 main epochs, because on 60k tokens the
# baseline's best validation epoch falls at 3-6 (it overfits after): both runs are compared at
# their best epoch (restore_best), not part-way down the curve, where the difference is speed.
SETTINGS = {
    "quick": ["data.max_tokens=60000", "data.max_vocab=4000", "data.eval_batch_size=128",
              "stages.warmup.max_epochs=1", "stages.main.max_epochs=8", "stages.linearity.fit_steps=100"],
    "full": ["data.max_tokens=400000", "data.max_vocab=8000", "data.eval_batch_size=128",
             "stages.warmup.max_epochs=2", "stages.main.max_epochs=4", "stages.linearity.fit_steps=300"],
}


def koopman_losses(cap: float) -> list[str]:
    """koopman.hybrid's Koopman term with its weight and cap set to ``cap``; the rest as in the recipe."""
    return [f"stages.main.losses.koopman.weight={cap}", f"stages.main.losses.koopman.cap={cap}"]


def run_all(runs: dict[str, tuple[Recipe, Path]], jobs: int) -> dict[str, dict[str, Any]]:
    """Run the named recipes, ``jobs`` at a time (core's ``run_recipes``); returns each run's summary,
    with its koopman.epoch records and the epoch records of its main stage."""
    return {name: read_run(finished.path) for name, finished in run_recipes(runs, jobs).items()}


def read_run(run_dir: Path) -> dict[str, Any]:
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary["koopman_epochs"] = [r for r in records if r["event"] == "koopman.epoch"]
    summary["main_epochs"] = [r for r in records if r["event"] == "epoch" and r["stage"] == "main"]
    return summary


def stage_fallbacks(summary: dict[str, Any]) -> int:
    """Batches whose Koopman weight was cut over the whole main stage: the engine's count is
    cumulative, so the last epoch's record holds it (the summary's metrics stop at the best epoch)."""
    return summary["main_epochs"][-1]["train/koopman/fallbacks"]


def recipe_overrides(data: Path, mode: str, extra: list[str]) -> dict[str, list[str]]:
    """Per recipe, the script's settings, then its share of ``extra`` (--set, shared out as compare does);
    the seed, which --seeds sets, follows (``at_seed``)."""
    # one thread per run: on a shared machine, torch's thread pools oversubscribe the cores and
    # stall, which swamps the timing; both runs get the same single core
    common = [f"data.path={data}", "run.threads=1", *SETTINGS[mode]]
    refused = [item for item in extra if item.removeprefix("~").partition("=")[0].strip() in SCRIPTS_OWN]
    if refused:  # else the result would list them under "overrides" as if they had been used
        raise StagewiseError(f"--set {' '.join(refused)}: the benchmark sets {', '.join(SCRIPTS_OWN)} itself (--seeds "
                          f"gives the seeds, the sweep the term's weight and cap); leave them out")
    return {name: [*common, *share] for name, share in zip(RECIPES, overrides_by_recipe(list(RECIPES), extra),
                                                             strict=True)}


def at_seed(overrides: list[str], seed: int) -> list[str]:
    return [*overrides, f"run.seed={seed}"]


def pair_row(seed: int, base: dict[str, float], hybrid: dict[str, float]) -> dict[str, float]:
    """One seed's baseline and hybrid metrics -> perplexities, their changes and the linearity gain."""
    return {"seed": seed, "baseline_ppl": base["val/ppl"], "hybrid_ppl": hybrid["val/ppl"],
            "ppl_change_pct": 100 * (hybrid["val/ppl"] / base["val/ppl"] - 1),
            "test_ppl_change_pct": 100 * (hybrid["test/ppl"] / base["test/ppl"] - 1),
            "linearity_gain": base["linearity/one_step_error"] / hybrid["linearity/one_step_error"]}


def hybrid_recipe(overrides: dict[str, list[str]], seed: int, cap: float) -> Recipe:
    """koopman.hybrid at ``seed`` with its term's weight and cap set to ``cap``."""
    return load_recipe("koopman.hybrid", [*at_seed(overrides["koopman.hybrid"], seed), f"run.name=koopman_hybrid_{cap}",
                                          *koopman_losses(cap)])


def planned_runs(overrides: dict[str, list[str]], seeds: int, out: Path) -> dict[str, tuple[Recipe, Path]]:
    """Every run, loaded before the first starts (a --set the hybrid alone refuses stops the benchmark
    at once), in the order they start: the two runs time_ratio compares first, side by side under
    ``--jobs 2``, then the rest of the sweep, then each further seed's baseline and hybrid."""
    runs = {"baseline": (load_recipe("koopman.baseline", at_seed(overrides["koopman.baseline"], 0)), out / "baseline")}
    for cap in sorted(CAPS, key=lambda cap: cap != HYBRID_CAP):
        runs[f"hybrid_{cap}"] = (hybrid_recipe(overrides, 0, cap), out / f"hybrid_{cap}")
    for seed in range(1, seeds):
        runs[f"baseline_seed{seed}"] = (load_recipe("koopman.baseline", at_seed(overrides["koopman.baseline"], seed)),
                                        out / f"baseline_seed{seed}")
        runs[f"hybrid_seed{seed}"] = (hybrid_recipe(overrides, seed, HYBRID_CAP), out / f"hybrid_seed{seed}")
    return runs


def measure(data: Path, mode: str, out: Path, seeds: int = 1, extra: Sequence[str] = (),
            jobs: int = 1) -> dict[str, Any]:
    summaries = run_all(planned_runs(recipe_overrides(data, mode, list(extra)), seeds, out), jobs)
    baseline = summaries["baseline"]
    base_error = baseline["metrics"]["linearity/one_step_error"]
    hybrids = {cap: summaries[f"hybrid_{cap}"] for cap in CAPS}
    hybrid, m = hybrids[HYBRID_CAP], hybrids[HYBRID_CAP]["metrics"]
    result = {
        "baseline_ppl": baseline["metrics"]["val/ppl"],
        "hybrid_ppl": m["val/ppl"],
        "koopman_forward_ppl": m["forward/koopman_ppl"],
        "koopman_forward_layers": m["forward/replaced_layers"],
        "koopman_forward_ratio": m["forward/ppl_ratio"],
        "koopman_share": hybrid["koopman_epochs"][-1]["koopman/share"],
        "linearity_gain": base_error / m["linearity/one_step_error"],
        "fallbacks": stage_fallbacks(hybrid),
        "time_ratio": hybrid["stages"]["main"]["seconds"] / baseline["stages"]["main"]["seconds"],
        "baseline_test_ppl": baseline["metrics"]["test/ppl"],
        "hybrid_test_ppl": m["test/ppl"],
        "hybrid_weight": m["train/koopman/weight"],
        "seconds": {"baseline_main": baseline["stages"]["main"]["seconds"],
                    "hybrid_main": hybrid["stages"]["main"]["seconds"]},
        "mode": mode,
        "jobs": jobs,
        "overrides": list(extra),
        "sweep": [{"cap": cap, "ppl": h["metrics"]["val/ppl"],
                   "linearity_gain": base_error / h["metrics"]["linearity/one_step_error"]}
                  for cap, h in hybrids.items()],
    }
    if seeds > 1:
        at = {seed: (summaries[f"baseline_seed{seed}"], summaries[f"hybrid_seed{seed}"]) for seed in range(1, seeds)}
        rows = [pair_row(0, baseline["metrics"], m), *(pair_row(seed, b["metrics"], h["metrics"])
                                                       for seed, (b, h) in at.items())]
        result["seeds"] = rows
        result["seeds_mean"] = {key: statistics.mean(row[key] for row in rows)
                                for key in ("ppl_change_pct", "test_ppl_change_pct", "linearity_gain")}
    return result


def table(result: dict[str, Any]) -> str:
    rows = [("val PPL baseline", result["baseline_ppl"], "measured"),
            ("val PPL hybrid", result["hybrid_ppl"], f"target <= {1.01 * result['baseline_ppl']:.2f}"),
            (f"Koopman-forward PPL ({result['koopman_forward_layers']} layers)", result["koopman_forward_ppl"],
             f"x{result['koopman_forward_ratio']:.3f} of standard; target <= x1.5"),
            ("koopman_share", result["koopman_share"], "weighted term / total loss"),
            ("linearity_gain", result["linearity_gain"], "target >= 2"),
            ("fallbacks", result["fallbacks"], "batches with the weight cut"),
            ("time_ratio", result["time_ratio"], "hybrid / baseline main stage; target <= 1.5")]
    lines = [f"{name:<36}{value:>12.4g}  {note}" for name, value, note in rows]
    if result["overrides"]:
        lines.append(f"{'--set':<36}{' '.join(result['overrides'])}")
    lines += ["", f"{'cap':>8}{'val PPL':>12}{'linearity_gain':>16}"]
    lines += [f"{s['cap']:>8}{s['ppl']:>12.4f}{s['linearity_gain']:>16.3f}" for s in result["sweep"]]
    if "seeds" in result:
        lines += ["", f"{'seed':>8}{'baseline PPL':>14}{'hybrid PPL':>12}{'change %':>10}{'test change %':>15}"
                  f"{'linearity_gain':>16}"]
        changes = [(f"{s['seed']:>8}{s['baseline_ppl']:>14.4f}{s['hybrid_ppl']:>12.4f}", s) for s in result["seeds"]]
        changes.append((f"{'mean':>8}{'':>26}", result["seeds_mean"]))
        lines += [f"{head}{s['ppl_change_pct']:>10.2f}{s['test_ppl_change_pct']:>15.2f}{s['linearity_gain']:>16.3f}"
                  for head, s in changes]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="directory with train.txt, valid.txt, test.txt (UTF-8) "
                        f"(default: {DEFAULT_DATA} dealt by 40-line chunk)")
    parser.add_argument("--out", type=Path, help="new or empty directory for the run directories (and the "
                        "dealt data); default: runs/koopman-bench, or runs/koopman-bench-2, ...")
    parser.add_argument("--json", type=Path, help="also write the result to this JSON file")
    parser.add_argument("--quick", action="store_true", help="less data and fewer epochs (under 10 minutes)")
    parser.add_argument("--seeds", type=int, default=1, help="also run baseline and hybrid at seeds 1..N-1 "
                        "(2 more runs per seed) to show the seed-to-seed spread (default 1: seed 0 only)")
    add_jobs_option(parser)
    add_set_option(parser, "It refuses the seed (--seeds) and the Koopman term's weight and cap (the sweep's).")
    args = parser.parse_args(argv)

    def body(out: Path) -> dict[str, Any]:
        data = args.data
        if data is None:  # a by-file split would validate on one kind of text, train on others
            data = out / "data"
            # errors="replace": nine files hold Latin-1 bytes, read as U+FFFD as when the results were recorded
            write_file_split(DEFAULT_DATA, data, valid=2, test=6, chunk_lines=40, seed=0, errors="replace")
        return measure(data, "quick" if args.quick else "full", out, args.seeds, args.overrides, args.jobs)

    return run_benchmark("hybrid_vs_baseline", body, table, args.out, "koopman-bench", args.json)


if __name__ == "__main__":
    sys.exit(main())
