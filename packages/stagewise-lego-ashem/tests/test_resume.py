"""An ASHEM run killed with SIGKILL and resumed ends with exactly the numbers and records of an
uninterrupted one: the cache and router artifacts, the grown model and phase 2's place in the
cache come back from the checkpoint."""

from __future__ import annotations

import math
import shutil

import pytest
from conftest import TINY, read_summary

from stagewise.engine.checkpoint import load_checkpoint
from stagewise.engine.runner import run_recipe
from stagewise.errors import CheckpointError
from stagewise.recipe import load_recipe
from stagewise.testing import damaged_copy, resume_run, run_killed, run_stopped, timeless_records


def _overrides(context):
    return ["run.log_every_n_steps=1", "run.checkpoint_every_n_steps=3", f'stages.phase2.context="{context}"']


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """``whole(context)``: (the recipe file, an uninterrupted run of it), run once per context."""
    folder = tmp_path_factory.mktemp("resume")
    path = folder / "tiny.toml"
    path.write_text(TINY)
    runs = {}

    def run(context):
        if context not in runs:
            recipe = load_recipe(path, _overrides(context))
            runs[context] = run_recipe(recipe, out=folder / f"whole_{context}", quiet=True)
        return path, runs[context]

    return run


# phase 2 takes 8 steps an epoch; checkpoints at steps 3 and 6 and each epoch's end
@pytest.mark.parametrize("context, stage, step, last", [
    ("full", "phase2", 0, ("mine", True, None)),  # right after mine: cache from the checkpoint, grow again
    ("full", "phase2", 10, ("phase2", False, (1, 1))),  # epoch 1 of the cache, a step after its checkpoint
    ("token", "phase2", 10, ("phase2", False, (1, 1))),  # the same with the hard tokens alone
], ids=["after-mine", "phase2-full", "phase2-token"])
def test_resume_after_sigkill_matches_uninterrupted_run(whole, tmp_path, context, stage, step, last):
    path, uninterrupted = whole(context)
    killed = tmp_path / "killed"
    run_killed(path, killed, stage, step, _overrides(context))
    saved = load_checkpoint(killed / "checkpoints" / "last.pt")
    position = (saved["loop"]["epoch"], saved["loop"]["batch"]) if "loop" in saved else None
    assert (saved["stage_name"], saved["stage_done"], position) == last

    resume_run(path, killed, _overrides(context))
    assert read_summary(killed)["metrics"] == read_summary(uninterrupted)["metrics"]
    assert timeless_records(killed) == timeless_records(uninterrupted)
    routers = [load_checkpoint(run / "checkpoints" / "last.pt")["routers"] for run in (killed, uninterrupted)]
    assert routers[0] == routers[1] and "lego_ashem.router" in routers[0]  # the kept router came back too


# --- a last.pt whose artifacts are not what mine writes -------------------------------------------------------


@pytest.fixture(scope="module")
def stopped_in_phase2(tmp_path_factory):
    """The tiny recipe stopped in phase2: its last.pt (phase2's step 3) holds the cache and the router record."""
    folder = tmp_path_factory.mktemp("stopped")
    (folder / "tiny.toml").write_text(TINY)
    recipe = load_recipe(folder / "tiny.toml", ["run.checkpoint_every_n_steps=3"])
    return recipe, run_stopped(recipe, folder / "run", "phase2", 4)


_CACHE, _ROUTER = "lego_ashem.cache", "lego_ashem.router"
# each found by fuzzing (a value inside last.pt's artifacts changed, then resumed): each was a traceback
_DAMAGE = [
    ("cache-float", lambda a: a.update({_CACHE: float("nan")}),  # TypeError building the dataset
     "artifacts.lego_ashem.cache: a float, expected a table of split, exit_layer, hidden, target, hard"),
    ("cache-no-target", lambda a: a[_CACHE].pop("target"), "artifacts.lego_ashem.cache: a dict, expected"),  # KeyError
    ("cache-hard-cut", lambda a: a[_CACHE].update(hard=a[_CACHE]["hard"][:2]),  # IndexError
     "artifacts.lego_ashem.cache.hard: a torch.bool tensor of shape (2, 8), expected a torch.bool tensor of shape"),
    ("cache-hidden-float64", lambda a: a[_CACHE].update(hidden=a[_CACHE]["hidden"].double()),  # matmul's dtype error
     "artifacts.lego_ashem.cache.hidden: a torch.float64 tensor of shape"),
    ("cache-target-ids", lambda a: a[_CACHE]["target"].fill_(10**6),
     "artifacts.lego_ashem.cache.target: holds ids outside the vocabulary 0..299"),
    ("cache-split", lambda a: a[_CACHE].update(split="nope"), "artifacts.lego_ashem.cache.split: 'nope' is no split"),
    ("router-missing", lambda a: a.pop(_ROUTER),  # KeyError in the curve of the test stage
     "artifacts: lacks lego_ashem.router, which an earlier lego_ashem.mine stage writes"),
    ("router-hard-ratio", lambda a: a[_ROUTER].update(hard_ratio="x"),  # TypeError in ConfidenceOptions
     "artifacts.lego_ashem.router.hard_ratio: 'x', expected a number strictly between 0 and 1"),
    ("router-measure", lambda a: a[_ROUTER].update(measure=0.5),  # ValueError scoring the logits
     "artifacts.lego_ashem.router.measure: 0.5, expected one of max_prob, margin, neg_entropy, probe"),
    ("router-quantiles", lambda a: a[_ROUTER]["quantiles"].__setitem__(0, []),  # TypeError routing by []
     "artifacts.lego_ashem.router.quantiles: expected 21 finite numbers in ascending order"),
    # the checks' boundaries: a check off by one there let each of these through
    ("cache-target-vocab-size", lambda a: a[_CACHE]["target"].fill_(300),
     "artifacts.lego_ashem.cache.target: holds ids outside the vocabulary 0..299"),
    ("cache-exit-layer-above", lambda a: a[_CACHE].update(exit_layer=a[_CACHE]["exit_layer"] + 1),
     "artifacts.lego_ashem.cache.exit_layer: 3, expected the model's exit layer 2"),
    ("router-quantiles-descending", lambda a: a[_ROUTER]["quantiles"].reverse(),
     "artifacts.lego_ashem.router.quantiles: expected 21 finite numbers in ascending order"),
]


@pytest.mark.parametrize("damage, problem", [d[1:] for d in _DAMAGE], ids=[d[0] for d in _DAMAGE])
def test_resume_refuses_artifacts_that_mine_did_not_write_by_key(stopped_in_phase2, tmp_path, damage, problem):
    recipe, stopped = stopped_in_phase2
    run = damaged_copy(stopped, tmp_path / "run", lambda saved: damage(saved["artifacts"]))
    last = run / "checkpoints" / "last.pt"
    with pytest.raises(CheckpointError) as info:
        run_recipe(recipe, resume=run, quiet=True)
    assert str(info.value).startswith(f"{last}: a damaged stagewise checkpoint: what it holds is not what a run "
                                      f"writes there: {problem}")
    assert f"Copy {run / 'checkpoints' / 'mine.pt'} (stage 'mine', the last one that finished) over" in str(info.value)


def test_a_resume_of_untouched_artifacts_passes_the_checks(stopped_in_phase2, tmp_path):
    recipe, stopped = stopped_in_phase2
    run = shutil.copytree(stopped, tmp_path / "run")
    run_recipe(recipe, resume=run, quiet=True)
    assert "test/routed_ppl" in read_summary(run)["metrics"]


def test_resume_refuses_a_model_whose_calibrated_threshold_is_gone(stopped_in_phase2, tmp_path):
    # NaN is the buffer's "not set": after mine it made routing raise a RuntimeError in the test stage
    recipe, stopped = stopped_in_phase2
    run = damaged_copy(stopped, tmp_path / "run", lambda saved: saved["model"]["routing_threshold"].fill_(math.nan))
    with pytest.raises(CheckpointError, match=r"model\.routing_threshold: not set \(NaN\), but the lego_ashem\.mine "
                                              r"stage before this one calibrated it"):
        run_recipe(recipe, resume=run, quiet=True)
