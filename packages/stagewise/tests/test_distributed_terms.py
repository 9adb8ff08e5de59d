"""Loss terms under torchrun: a term of weight 0, not switched on yet or cut by its fallback, and a
term's own parameters train in a 2-process job as in one process."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from ddp_jobs import RECIPE, REL_TOL, assert_close, child, launcher, needs_gloo, records, run_python, summary

import stagewise
from stagewise.engine.checkpoint import load_checkpoint
from stagewise.testing import resume_run, run_killed, run_uninterrupted, timeless_records

NOT_YET = '''\
class NotYet(stagewise.Loss):
    """NaN in value and gradient: an auxiliary term that is not switched on yet."""

    name = "ddptest.not_yet"

    def forward(self, outputs, batch, state):
        return torch.sqrt(-1.0 - outputs["logits"].pow(2).mean())
'''

WITH_PARAMETER = '''\
class Scaled(stagewise.Loss):
    """A term with a parameter of its own, as a Koopman operator or a probe has."""

    name = "ddptest.scaled"

    def setup(self, state):
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, outputs, batch, state):
        return (self.scale * outputs["logits"].mean()).square()
'''


VARYING = '''\
class Varying(stagewise.Loss):
    """A part that only some shares of a batch give (here rank 0's), as a part that needs some kind of example."""

    name = "ddptest.varying"

    def forward(self, outputs, batch, state):
        mean = outputs["logits"].mean()
        return {"square": mean.square(), **({"abs": mean.abs()} if state.dist.rank == 0 else {})}
'''


NOT_YET_GRADIENT = '''\
class NotYetGradient(stagewise.Loss):
    """A finite value (0) whose gradient is not (a square root at 0): an auxiliary term not switched on yet."""

    name = "ddptest.not_yet_gradient"

    def forward(self, outputs, batch, state):
        logits = outputs["logits"]
        return (logits - logits.detach()).pow(2).mean().sqrt()
'''

HUGE = '''\
class Huge(stagewise.Loss):
    """Infinite: a term whose fallback cuts it to weight 0."""

    name = "ddptest.huge"

    def forward(self, outputs, batch, state):
        return torch.exp(outputs["logits"].abs().max() * 1e4)
'''


@needs_gloo
@pytest.mark.parametrize(("loss", "cls", "term"), [
    (NOT_YET, "NotYet", 'use = "ddptest.not_yet", start_epoch = 5'),
    (NOT_YET_GRADIENT, "NotYetGradient", 'use = "ddptest.not_yet_gradient", start_epoch = 5'),
    (HUGE, "Huge", 'use = "ddptest.huge", weight = 0.1, fallback_threshold = 1e6, fallback_factor = 0.0'),
], ids=["value", "gradient", "cut"])
def test_a_term_of_weight_0_that_is_not_finite_trains_under_ddp_as_in_one_process(tmp_path, loss, cls, term):
    # was: DDP put every term in the graph, one of weight 0 as 0 · NaN, so every batch was skipped (and
    # max_nonfinite stopped a longer job) where one process, which leaves the term out, trains on; and a NaN
    # gradient (0 · inf) reached every weight at the first step, whose next loss was then NaN
    (tmp_path / "launch.py").write_text(launcher(loss, cls))
    (tmp_path / "recipe.toml").write_text(RECIPE + f'losses = [{{ use = "stagewise.cross_entropy" }}, {{ {term} }}]\n')
    run_python(["launch.py", "run", "recipe.toml", "--out", "single", "--quiet"], tmp_path)
    run_python(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "launch.py", "run", "recipe.toml", "--out", "ddp", "--quiet"], tmp_path)
    single, ddp = summary(tmp_path / "single")["metrics"], summary(tmp_path / "ddp")["metrics"]
    assert ddp["train/nonfinite"] == single["train/nonfinite"] == 0
    assert_close(ddp, single, "final metrics")


@needs_gloo
def test_a_term_whose_parts_differ_between_processes_stops_the_job_with_an_error(tmp_path):
    # was: the ranks' all-reduces of the terms' values and parts differed in length, and the job hung
    (tmp_path / "launch.py").write_text(launcher(VARYING, "Varying"))
    (tmp_path / "recipe.toml").write_text(RECIPE.replace("max_epochs = 2", "max_epochs = 1") + (
        'losses = [{ use = "stagewise.cross_entropy" }, { use = "ddptest.varying", name = "aux", weight = 0.1 }]\n'))
    done = child(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                  "launch.py", "run", "recipe.toml", "--out", "ddp", "--quiet"], tmp_path)
    assert done.returncode != 0
    assert "stage 'train' epoch 0 batch 0: under torchrun the loss terms returned other parts" in done.stderr
    assert "'aux' (ddptest.varying): square, abs" in done.stderr, done.stderr


@needs_gloo
def test_a_switched_off_term_s_parameters_stay_untouched_under_ddp(tmp_path):
    # was: DDP gave them zero gradients (the term is in the graph at weight 0), and AdamW then
    # decayed them every step; in one process a term not switched on yet is not computed at all
    (tmp_path / "launch.py").write_text(launcher(WITH_PARAMETER, "Scaled"))
    (tmp_path / "recipe.toml").write_text(RECIPE.replace("max_epochs = 2", "max_epochs = 1") + (
        'weight_decay = 0.5\nlosses = [{ use = "stagewise.cross_entropy" }, { use = "ddptest.scaled", '
        'start_epoch = 5 }]\n'))
    run_python(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "launch.py", "run", "recipe.toml", "--out", "ddp", "--quiet"], tmp_path)
    assert torch.load(tmp_path / "term.pt", weights_only=True)["scale"].item() == 1.0


# an installed plugin (a dist-info folder on PYTHONPATH), so that stagewise.testing's children load it:
# a term with a parameter, a mean over examples (so 2 processes compute what one does), and each rank's
# weights (the model's and the terms') after each stage
TERM_PLUGIN = '''\
import os

import torch

import stagewise


class Scaled(stagewise.Loss):
    name = "ddptest.scaled"

    def setup(self, state):
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, outputs, batch, state):
        return (self.scale * outputs["logits"].mean(-1)).square().mean()


@stagewise.hookimpl
def stagewise_register_losses(register):
    register(Scaled)


@stagewise.hookimpl
def stagewise_after_stage(state):
    weights = {**state.model.state_dict(), **{f"{n}.{k}": v for n, t in state.terms.items()
                                              for k, v in t.state_dict().items()}}
    torch.save(weights, os.path.join(os.environ["DDPTEST_WEIGHTS"], f"rank{state.dist.rank}.pt"))
'''

# the scaled term in 3 ways: off in epoch 0 ("late", "ramped": weight 0.5 in epoch 1), and cut to weight 0 at
# every batch by its fallback ("cut"); weight decay, so that a zero gradient would move a parameter
LATE_TERMS = RECIPE + """\
weight_decay = 0.5
losses = [{ use = "stagewise.cross_entropy" },
          { use = "ddptest.scaled", name = "late", start_epoch = 1 },
          { use = "ddptest.scaled", name = "ramped", start_epoch = 1, ramp_epochs = 2 },
          { use = "ddptest.scaled", name = "cut", fallback_threshold = 0.0, fallback_factor = 0.0 }]
"""
KILLED_IN_EPOCH_0 = ["run.checkpoint_every_n_steps=3"]  # killed after step 4: resumed from step 3, terms off


@pytest.fixture(scope="module")
def late_terms(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """LATE_TERMS run in one process (``single``), by 2 (``ddp``), and by 2 killed in epoch 0 and resumed
    (``resumed``); each run's folder also holds its ranks' final weights (``rank0.pt``, ...)."""
    root = tmp_path_factory.mktemp("late_terms")
    site = root / "site"
    info = site / "ddptest-0.0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ddptest\nVersion: 0.0.1\n")
    (info / "entry_points.txt").write_text("[stagewise]\nddptest = ddptest\n")
    (site / "ddptest.py").write_text(TERM_PLUGIN)
    recipe = root / "recipe.toml"
    recipe.write_text(LATE_TERMS)
    runs = SimpleNamespace(**{name: root / name for name in ("single", "ddp", "resumed")})
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p))
        env.setenv("STAGEWISE_LOAD_PLUGINS", "ddptest")
        for name, processes in (("single", 1), ("ddp", 2)):
            getattr(runs, name).mkdir()
            env.setenv("DDPTEST_WEIGHTS", str(getattr(runs, name)))
            run_uninterrupted(recipe, getattr(runs, name), KILLED_IN_EPOCH_0, processes=processes)
        env.setenv("DDPTEST_WEIGHTS", str(runs.resumed))
        run_killed(recipe, runs.resumed, "train", 4, KILLED_IN_EPOCH_0, processes=2)
        runs.checkpoint = load_checkpoint(runs.resumed / "checkpoints" / "last.pt")
        resume_run(recipe, runs.resumed, KILLED_IN_EPOCH_0, processes=2)
    return runs


def _weights(run_dir: Path, rank: int = 0) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / f"rank{rank}.pt", weights_only=True)


@needs_gloo
def test_terms_switched_on_later_train_alike_on_every_rank_and_as_in_one_process(late_terms):
    single = records(late_terms.single)
    epochs = [r for r in single if r["event"] == "epoch"]
    assert ["train/late" in r for r in epochs] == [False, True] and epochs[1]["train/ramped/weight"] == 0.5
    assert epochs[0]["train/cut/weight"] == 0.0 and epochs[0]["train/cut/fallbacks"] == 6  # cut at every batch
    ddp = _weights(late_terms.ddp)
    for name, tensor in _weights(late_terms.ddp, rank=1).items():
        assert torch.equal(tensor, ddp[name]), f"{name}: the ranks drifted apart"
    for name, tensor in _weights(late_terms.single).items():
        assert torch.allclose(ddp[name], tensor, rtol=REL_TOL, atol=1e-6), f"{name}: not the one process's"
    assert ddp["cut.scale"].item() == 1.0  # it never took part in a step: untouched, as in one process
    assert ddp["late.scale"].item() != 1.0 and ddp["ramped.scale"].item() != 1.0  # trained in epoch 1
    assert_close(summary(late_terms.ddp)["metrics"], summary(late_terms.single)["metrics"], "final metrics")


@needs_gloo
def test_a_torchrun_job_killed_while_terms_are_off_resumes_to_the_uninterrupted_numbers(late_terms):
    assert (late_terms.checkpoint["loop"]["epoch"], late_terms.checkpoint["step"]) == (0, 3)
    assert summary(late_terms.resumed)["metrics"] == summary(late_terms.ddp)["metrics"]  # bit-identical
    assert timeless_records(late_terms.resumed) == timeless_records(late_terms.ddp)
    resumed, ddp = _weights(late_terms.resumed), _weights(late_terms.ddp)
    assert resumed.keys() == ddp.keys() and all(torch.equal(resumed[k], ddp[k]) for k in ddp)


@needs_gloo
@pytest.mark.parametrize("k", [1, 2])
def test_a_step_whose_every_term_is_cut_to_weight_0_leaves_the_model_as_one_process_does(tmp_path, k):
    # was: DDP gave the model zero gradients (every term in the graph at weight 0), and AdamW decayed its weights;
    # one process computes no gradient, and the optimizer leaves the model alone
    (tmp_path / "recipe.toml").write_text(RECIPE.replace("max_epochs = 2", "max_epochs = 1") + (
        f'weight_decay = 0.5\naccumulate_batches = {k}\nlosses = [{{ use = "stagewise.cross_entropy", '
        'fallback_threshold = 0.0, fallback_factor = 0.0 }]\n'))
    run_python(["-m", "stagewise", "run", "recipe.toml", "--out", "single", "--quiet"], tmp_path)
    run_python(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "-m", "stagewise", "run", "recipe.toml", "--out", "ddp", "--quiet"], tmp_path)
    assert summary(tmp_path / "ddp")["metrics"]["train/cross_entropy/fallbacks"] == 6 * k  # cut at every batch
    single, ddp = (stagewise.load_model(tmp_path / run).state_dict() for run in ("single", "ddp"))
    assert all(torch.equal(ddp[key], value) for key, value in single.items())
