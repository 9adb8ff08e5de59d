"""The tiny hybrid recipe end to end: golden numbers, determinism, what it hands on and logs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import run_tiny

from stagewise.plots import have_matplotlib
from stagewise.verify import verify_run

# Some final metrics of run_tiny; after a deliberate behaviour change, run run_tiny (conftest.py)
# and copy the same keys from its summary.json, saying in the commit which numbers moved and why.
GOLDEN = Path(__file__).parent / "golden" / "tiny_hybrid.json"


def test_golden_record(tiny_run):
    assert verify_run(tiny_run, GOLDEN) == []


def test_same_seed_gives_bit_identical_metrics(tiny_run, tmp_path):
    again = run_tiny(tmp_path / "again")
    assert json.loads((again / "summary.json").read_text())["metrics"] == \
        json.loads((tiny_run / "summary.json").read_text())["metrics"]


def test_trained_operator_is_handed_on_in_the_artifacts(tiny_run):
    saved = torch.load(tiny_run / "checkpoints" / "last.pt", weights_only=True)
    operator = saved["artifacts"]["koopman.operators"]["koopman"]
    assert operator["sources"] == [0, 1, 2] and operator["n_hidden"] == 4 and operator["width"] == 16
    assert operator["state"]["operator"].shape == (3, 8, 8)
    assert not torch.equal(operator["state"]["operator"][0], torch.eye(8))  # trained away from its init


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_tiny_hybrid_runs_on_cuda_to_its_cpu_figures(tiny_run, tmp_path):
    # the golden is a CPU record; on a GPU the same recipe must run through and land close to it
    on_cuda = run_tiny(tmp_path / "cuda", overrides=["run.device=cuda"])
    cpu, gpu = (json.loads((run / "summary.json").read_text())["metrics"] for run in (tiny_run, on_cuda))
    assert set(gpu) == set(cpu)
    for key in ("val/ppl", "forward/ppl", "forward/koopman_ppl", "linearity/one_step_error", "test/loss"):
        assert gpu[key] == pytest.approx(cpu[key], rel=1e-2), key


def test_each_epoch_logs_operator_change_and_share(tiny_run):
    records = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    koopman = [r for r in records if r["event"] == "koopman.epoch"]
    assert [r["epoch"] for r in koopman] == [0, 1, 2]
    assert koopman[0]["koopman/K0/change"] == 0.0 and koopman[0]["koopman/share"] == 0.0  # weight 0 in epoch 0
    assert all(r[f"koopman/K{layer}/change_pct"] > 0 for r in koopman[1:] for layer in range(3))
    assert 0 < koopman[2]["koopman/share"] < 1


def test_forward_mode_and_spectrum_are_reported(tiny_run):
    metrics = json.loads((tiny_run / "summary.json").read_text())["metrics"]
    assert metrics["forward/replaced_layers"] == 2
    assert metrics["forward/ppl_ratio"] == metrics["forward/koopman_ppl"] / metrics["forward/ppl"]
    assert metrics["forward/ppl"] == metrics["test/ppl"]  # the standard pass is the model's own
    assert (tiny_run / "plots" / "koopman_spectrum.png").exists() == have_matplotlib()


def test_share_is_the_weighted_term_over_the_total_loss(tiny_run):
    """koopman/share = train/koopman/weighted ÷ train/loss of the same epoch (the weighted term,
    after the ramp and the fallbacks, not the raw one)."""
    from stagewise_koopman.events import koopman_share

    assert koopman_share({"train/loss": 4.0, "train/koopman": 10.0, "train/koopman/weighted": 1.0}, "koopman") == 0.25
    assert koopman_share({"train/loss": 4.0}, "koopman") == 0.0  # the term was off
    records = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["event"] == "epoch" and r["stage"] == "main"]
    shares = [r["koopman/share"] for r in records if r["event"] == "koopman.epoch"]
    assert epochs[2]["train/koopman/weighted"] != epochs[2]["train/koopman"]  # the test can tell them apart
    assert shares[1:] == [pytest.approx(e["train/koopman/weighted"] / e["train/loss"], rel=1e-12) for e in epochs[1:]]


def test_the_time_axis_trains_as_the_docs_say_to_run_it(tmp_path):
    """docs/plugins/koopman.md: axis = "time" on the hybrid, without the forward stage, its fit along time too."""
    overrides = ['stages.main.losses.koopman.axis="time"', "~stages.forward", 'stages.linearity.fit.axis="time"']
    run_dir = run_tiny(tmp_path / "time", overrides=overrides)
    metrics = json.loads((run_dir / "summary.json").read_text())["metrics"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r["event"] == "koopman.epoch"][-1]
    # along time the source layers are h_1..h_3 (positions t -> t+1 within each), the embedding left out
    assert [k for k in last if k.endswith("/change_pct")] == [f"koopman/K{layer}/change_pct" for layer in (1, 2, 3)]
    assert all(last[f"koopman/K{layer}/change_pct"] > 0 for layer in (1, 2, 3))
    assert sorted(k for k in metrics if k.startswith("linearity/L")) == [f"linearity/L{layer}/one_step_error"
                                                                        for layer in (1, 2, 3)]
    assert all(math.isfinite(metrics[k]) for k in ("train/koopman", "val/koopman/one_step", "val/ppl"))
    assert not any(k.startswith("forward/") for k in metrics)
