"""The engine's weight schedule and fallback act on the Koopman term exactly as configured."""

from __future__ import annotations

import json

import pytest
from conftest import TRAIN_ONLY, run_tiny

from stagewise.specs import LossSpec


def epochs_with_threshold(tmp_path, threshold: str) -> list[dict]:
    """The main stage's epoch records of TRAIN_ONLY run with this fallback_threshold."""
    recipe = TRAIN_ONLY.replace("fallback_threshold = 3.1", f"fallback_threshold = {threshold}")
    run_dir = run_tiny(tmp_path / "run", recipe)
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [r for r in records if r["event"] == "epoch" and r["stage"] == "main"]


def test_the_seeds_schedule_in_engine_terms():
    # seed: 0 for epochs 0-4 (0-based), then 0.05 * (e - 4) / 6, logged 0.0083 ... 0.0417
    spec = LossSpec(use="koopman.operator", weight=0.05, start_epoch=5, ramp_epochs=6)
    expected = [0, 0, 0, 0, 0, 0.05 / 6, 0.1 / 6, 0.15 / 6, 0.2 / 6, 0.25 / 6]
    assert [spec.weight_at(e) for e in range(10)] == pytest.approx(expected, abs=1e-15)


def test_warmup_then_linear_ramp_without_fallbacks(tmp_path):
    epochs = epochs_with_threshold(tmp_path, "1e9")
    assert "train/koopman" not in epochs[0]  # weight 0: the term is not even computed
    assert [e.get("train/koopman/weight") for e in epochs] == [None, pytest.approx(0.25), pytest.approx(0.5)]
    assert [e["train/koopman/fallbacks"] for e in epochs] == [0, 0, 0]
    assert not any("warnings/fallback/koopman" in e for e in epochs)


def test_every_batch_above_the_threshold_falls_back_and_is_counted(tmp_path, capsys):
    epochs = epochs_with_threshold(tmp_path, "0.0")
    err = capsys.readouterr().err
    # per epoch at weight > 0: the first cut batch's warning, the rest a count at the epoch's end
    assert err.count("stagewise: warning: loss term 'koopman' = ") == 2
    assert err.count("stagewise: warning: 'fallback/koopman' happened 3 times this epoch") == 2
    # scheduled 0.25 and 0.5, times fallback_factor 0.1, on each of the 3 steps of an epoch
    assert [e.get("train/koopman/weight") for e in epochs] == [None, pytest.approx(0.025), pytest.approx(0.05)]
    assert [e["train/koopman/fallbacks"] for e in epochs] == [0, 3, 6]  # counted over the stage
    assert [e.get("warnings/fallback/koopman") for e in epochs] == [None, 3, 3]  # one warning line, a count


def test_total_loss_uses_the_effective_weight(tmp_path):
    epoch = epochs_with_threshold(tmp_path, "0.0")[2]
    expected = epoch["train/cross_entropy"] + 0.05 * epoch["train/koopman"]
    assert epoch["train/loss"] == pytest.approx(expected, rel=1e-6)
