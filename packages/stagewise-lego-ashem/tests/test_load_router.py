"""stagewise_lego_ashem.load_router: a finished run's calibrated router, for routed inference in Python."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

import stagewise
import stagewise_lego_ashem
from stagewise.engine.checkpoint import load_checkpoint
from stagewise.engine.runner import run_recipe
from stagewise.recipe import recipe_from_table
from stagewise.testing import damaged_copy
from stagewise_lego_ashem.mining import ROUTER
from stagewise_lego_ashem.routed import generate_routed, routed_forward
from stagewise_lego_ashem.router import Confidence, ConfidenceOptions


def _probe_run(tiny, out):
    """phase 1, mine, then a probe stage: a run whose router scores with the model's exit probe."""
    table = tiny("model.exit_probe=true").table
    table["stages"] = [*table["stages"][:2], {"name": "probe", "use": "lego_ashem.train_exit_probe", "epochs": 2}]
    return run_recipe(recipe_from_table(table, "tiny+probe", []), out=out, quiet=True)


def _routes_as_the_manual_router(run, measure):
    """load_router's router routes as the one the README built by hand from the checkpoint's artifact."""
    model, router = stagewise.load_model(run), stagewise_lego_ashem.load_router(run)
    saved = load_checkpoint(run / "checkpoints" / "last.pt")["artifacts"][ROUTER]
    manual = Confidence(ConfidenceOptions(measure=saved["measure"]))
    assert router.options == ConfidenceOptions(measure=measure, hard_ratio=saved["hard_ratio"])
    assert router.threshold == saved["threshold"]
    idx = torch.arange(64).view(4, 16) % model.config.vocab_size
    with torch.no_grad():
        out = routed_forward(model, idx, router, router.threshold)
        expected = routed_forward(model, idx, manual, saved["threshold"])
        generated = generate_routed(model, idx[:1, :4], 5, router, router.threshold)
        expected_generated = generate_routed(model, idx[:1, :4], 5, manual, saved["threshold"])
    assert 0 < int(out["easy"].sum()) < out["easy"].numel()  # both routes taken: the threshold matters
    assert torch.equal(out["logits"], expected["logits"]) and torch.equal(out["easy"], expected["easy"])
    assert all(torch.equal(generated[k], expected_generated[k]) for k in ("tokens", "easy"))


def test_the_max_softmax_router_routes_as_the_one_built_from_the_checkpoint(tiny_run):
    _routes_as_the_manual_router(tiny_run, "max_prob")


def test_the_probe_router_routes_as_the_one_built_from_the_checkpoint(tiny, tmp_path):
    _routes_as_the_manual_router(_probe_run(tiny, tmp_path / "run"), "probe")


def test_a_checkpoint_before_mine_names_the_checkpoints_that_hold_the_router(tiny_run):
    with pytest.raises(stagewise.CheckpointError, match=r"phase1\.pt: holds no calibrated router \(lego_ashem\.router"
                       r".*written after the mine stage: mine\.pt, phase2\.pt, test\.pt"):
        stagewise_lego_ashem.load_router(tiny_run / "checkpoints" / "phase1.pt")


@pytest.mark.parametrize(("damage", "message"), [
    (lambda r: r["state"].update(threshold=math.nan), r"state\.threshold: nan, expected a finite number"),
    (lambda r: r["state"].update(threshold="0.5"), r"state\.threshold: '0\.5', expected a finite number"),
    (lambda r: r["state"].pop("threshold"), r"state: keys \[\], expected a table of threshold alone"),
    (lambda r: r["state"].update(other=1), r"state: keys \['other', 'threshold'\], expected a table of threshold "
                                            r"alone"),
    (lambda r: r["state"].update(threshold=True), r"state\.threshold: True, expected a finite number"),
    (lambda r: r["options"].update(measure="top1"), r"options\.measure: .*'top1'"),
    (lambda r: r.update(use="lego_ashem.other"), r"use: 'lego_ashem\.other', expected 'lego_ashem\.confidence'"),
    (lambda r: r["options"].update(measure="probe"), r"options\.measure: 'probe', but the checkpoint's model has no "
                                                     r"exit_probe"),
])
def test_a_router_a_run_never_keeps_is_refused_by_its_key_path(tiny_run, tmp_path, damage, message):
    run = damaged_copy(tiny_run, tmp_path / "run", lambda saved: damage(saved["routers"][ROUTER]))
    with pytest.raises(stagewise.CheckpointError, match=rf"last\.pt: not the router a run keeps: "
                                                        rf"routers\.lego_ashem\.router\.{message}"):
        stagewise_lego_ashem.load_router(run)


def test_a_checkpoint_from_before_routers_were_kept_says_so(tiny_run, tmp_path):
    # was: "holds no calibrated router ...; use a checkpoint written after the mine stage: mine.pt, ..." of mine.pt
    run = damaged_copy(tiny_run, tmp_path / "old", lambda saved: saved.pop("routers"))
    with pytest.raises(stagewise.CheckpointError, match=r"last\.pt: written by an earlier stagewise, which kept no "
                                                        r"routers in checkpoints; run the recipe again"):
        stagewise_lego_ashem.load_router(run)


def test_a_routers_table_a_run_never_writes_is_refused(tiny_run, tmp_path):
    run = damaged_copy(tiny_run, tmp_path / "extra", lambda saved: saved["routers"][ROUTER].update(extra=1))
    with pytest.raises(stagewise.CheckpointError, match=r"last\.pt: not the router a run keeps: routers\.lego_ashem"
                                                        r"\.router: a dict, expected a table of use, options, state;"):
        stagewise_lego_ashem.load_router(run)
    run = damaged_copy(tiny_run, tmp_path / "none", lambda saved: saved.update(routers=None))
    with pytest.raises(stagewise.CheckpointError, match=r"last\.pt: holds no calibrated router"):
        stagewise_lego_ashem.load_router(run)


def test_the_package_exports_load_router_without_importing_torch():
    code = ("import sys, stagewise_lego_ashem; assert 'torch' not in sys.modules, 'torch was imported'; "
            "assert callable(stagewise_lego_ashem.load_router)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
