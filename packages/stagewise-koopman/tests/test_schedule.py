"""The engine's weight schedule and fallback act on the Koopman term exactly as configured."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from conftest import TRAIN_ONLY, run_tiny

from stagewise.engine.guards import RateLimitedWarnings
from stagewise.engine.objective import TermWeights
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


@pytest.mark.parametrize(("keys", "table"), [  # hand-computed: 0 before start_epoch, weight·(e − start + 1)/ramp, ≤ cap
    ({"weight": 1.0, "start_epoch": 2, "ramp_epochs": 4, "cap": 0.3}, [0, 0, 0.25, 0.3, 0.3, 0.3]),
    ({"weight": 2.0, "ramp_epochs": 3, "cap": 1.0}, [2 / 3, 1.0, 1.0, 1.0, 1.0, 1.0]),
    ({"weight": 0.2, "start_epoch": 1, "ramp_epochs": 1}, [0, 0.2, 0.2, 0.2, 0.2, 0.2]),
    ({"weight": 0.7, "start_epoch": 3, "cap": 0.1}, [0, 0, 0, 0.1, 0.1, 0.1]),
    ({"weight": 0.5}, [0.5] * 6),
])
def test_scheduled_weights_match_a_hand_computed_table(keys, table):
    spec = LossSpec(use="koopman.operator", **keys)
    assert [spec.weight_at(e) for e in range(6)] == pytest.approx(table, abs=1e-15)


def test_a_batch_falls_back_only_above_the_threshold_counted_and_warned_once(capsys):
    spec = LossSpec(use="koopman.operator", name="koopman", weight=0.4, fallback_threshold=2.0, fallback_factor=0.25)
    warnings = RateLimitedWarnings()
    weights = TermWeights([spec], SimpleNamespace(warnings=warnings))
    values = [1.0, 2.0, 2.5, 5.0, 0.5, 3.0]  # at the threshold is not above it
    assert [weights.effective("koopman", 0.4, v) for v in values] == [0.4, 0.4, 0.1, 0.1, 0.4, 0.1]
    assert weights.effective("koopman", 0.0, 9.0) == 0.0  # weight 0 (warmup): nothing to cut, not counted
    assert weights.effective("koopman", 0.4, 9.0, count=False) == 0.1  # a re-evaluated batch: not counted again
    assert weights.fallbacks == {"koopman": 3}
    assert warnings.flush() == {"fallback/koopman": 3}
    err = capsys.readouterr().err
    assert err.count("stagewise: warning: loss term 'koopman' = 2.5 > fallback_threshold 2.0") == 1
    assert err.count("'fallback/koopman' happened 3 times this epoch") == 1
