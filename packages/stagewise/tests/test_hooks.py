"""One test per hook spec (``test_hook_<name>``); a meta-test keeps that list complete."""

from __future__ import annotations

import argparse
import json
import sys

import pytest

import stagewise
from stagewise import hookspecs, plugins
from stagewise.engine.runner import run_recipe
from stagewise.events import Event

HOOKS = sorted(n for n in dir(hookspecs) if n.startswith("stagewise_"))


class Recorder:
    """Records every run event it sees, in order, with a tag so ordering across plugins shows."""

    def __init__(self, tag, log):
        self.tag, self.log = tag, log

    @stagewise.hookimpl
    def stagewise_before_run(self, state):
        self.log.append((self.tag, "before_run"))

    @stagewise.hookimpl
    def stagewise_after_run(self, state, metrics):
        self.log.append((self.tag, "after_run", "test/ppl" in metrics))

    @stagewise.hookimpl
    def stagewise_before_stage(self, state, stage):
        self.log.append((self.tag, "before_stage", stage.label))

    @stagewise.hookimpl
    def stagewise_after_stage(self, stage, metrics):  # any subset of the spec's arguments
        self.log.append((self.tag, "after_stage", stage.label))

    @stagewise.hookimpl
    def stagewise_before_epoch(self, state):
        self.log.append((self.tag, "before_epoch", state.stage_name, state.epoch))

    @stagewise.hookimpl
    def stagewise_after_epoch(self, state, metrics):
        self.log.append((self.tag, "after_epoch", state.stage_name, "val/loss" in metrics))

    @stagewise.hookimpl
    def stagewise_before_step(self, state, batch):
        self.log.append((self.tag, "before_step", tuple(batch["input"].shape)))

    @stagewise.hookimpl
    def stagewise_after_step(self, state, loss):
        self.log.append((self.tag, "after_step", state.step, isinstance(loss, float), state.stage_name, loss))


@pytest.fixture(scope="module")
def events_run(tmp_path_factory):
    """The events both recorders saw in one tiny run, and the run's folder."""
    from conftest import TINY

    path = tmp_path_factory.mktemp("hooks") / "tiny.toml"
    path.write_text(TINY)
    log: list[tuple] = []
    plugins.register_plugin(Recorder("first", log), "first")
    plugins.register_plugin(Recorder("second", log), "second")
    try:
        recipe = stagewise.load_recipe(path, ["stages.phase1.max_steps_per_epoch=2", "stages.phase1.max_epochs=1"])
        run_dir = run_recipe(recipe, out=path.parent / "run", quiet=True)
    finally:
        plugins.unregister_plugin("first")
        plugins.unregister_plugin("second")
    return log, run_dir


@pytest.fixture
def events(events_run):
    return events_run[0]


def of(events, name):
    return [e for e in events if e[1] == name]


def test_every_hook_has_a_test():
    module = sys.modules[__name__]
    missing = [h for h in HOOKS if not hasattr(module, f"test_hook_{h}")]
    assert missing == []


def test_every_event_has_a_hook():
    assert sorted(e.hook_name for e in Event) == sorted(h for h in HOOKS if "register" not in h)


def test_hook_stagewise_before_run(events):
    assert events[:2] == [("first", "before_run"), ("second", "before_run")]  # registration order


def test_hook_stagewise_after_run(events):
    assert events[-2:] == [("second", "after_run", True), ("first", "after_run", True)]  # reversed


def test_hook_stagewise_before_stage(events):
    assert [e[2] for e in of(events, "before_stage") if e[0] == "first"] == ["phase1", "phase2", "test"]


def test_hook_stagewise_after_stage(events):
    assert of(events, "after_stage")[:2] == [("second", "after_stage", "phase1"), ("first", "after_stage", "phase1")]


def test_hook_stagewise_before_epoch(events):
    seen = [e[2:] for e in of(events, "before_epoch") if e[0] == "first"]
    assert seen == [("phase1", 0), ("phase2", 0), ("phase2", 1)]


def test_hook_stagewise_after_epoch(events):
    assert all(e[3] for e in of(events, "after_epoch")) and len(of(events, "after_epoch")) == 6


def test_hook_stagewise_before_step(events):
    assert of(events, "before_step")[0] == ("first", "before_step", (4, 8))
    assert len(of(events, "before_step")) == 2 * (2 + 10)


def test_hook_stagewise_after_step(events_run):
    events, run_dir = events_run
    steps = [e[2] for e in of(events, "after_step") if e[0] == "first"]
    assert steps[:2] == [1, 2] and all(e[3] for e in of(events, "after_step"))
    # the loss each step hands its hooks is the one it logs (the recipe logs every step)
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(e[4], e[2], e[5]) for e in of(events, "after_step") if e[0] == "first"] == [
        (r["stage"], r["step"], r["train/loss"]) for r in logged if r["event"] == "step"]


def _registered(kind, name, target):
    plugin = type("P", (), {})()
    setattr(plugin, f"stagewise_register_{kind}",
            stagewise.hookimpl(lambda register: register(target, name)))
    plugins.register_plugin(plugin, "hooktest")
    try:
        return plugins.get(kind, name)
    finally:
        plugins.unregister_plugin("hooktest")


def test_hook_stagewise_register_stages():
    assert _registered("stages", "hooktest.train", stagewise.TrainStage) is stagewise.TrainStage


def test_hook_stagewise_register_routers():
    class Everything(stagewise.Router):
        def route(self, scores):
            return stagewise.Routing(masks={"all": scores == scores})

    assert _registered("routers", "hooktest.everything", Everything) is Everything


def test_hook_stagewise_register_losses():
    loss = _registered("losses", "hooktest.ce", "stagewise.builtins.losses:CrossEntropy")
    assert loss.name == "stagewise.cross_entropy"


def test_hook_stagewise_register_models():
    assert _registered("models", "hooktest.mlp", "stagewise.nn.mlp:MLP").__name__ == "MLP"


def test_hook_stagewise_register_datasets():
    assert _registered("datasets", "hooktest.text", "stagewise.data.text:TextCorpus").__name__ == "TextCorpus"


def test_hook_stagewise_register_recipes(tmp_path):
    path = tmp_path / "r.toml"
    assert _registered("recipes", "hooktest.recipe", path) == path


def test_hook_stagewise_register_commands(capsys):
    from stagewise.cli.main import main

    class Hello:
        @stagewise.hookimpl
        def stagewise_register_commands(self, cli: argparse._SubParsersAction):
            p = cli.add_parser("hello", help="say hello")
            p.set_defaults(handler=lambda args: print("hello") or 3)

    plugins.register_plugin(Hello(), "hello")
    try:
        assert main(["hello"]) == 3
    finally:
        plugins.unregister_plugin("hello")
    assert capsys.readouterr().out == "hello\n"


def test_event_hooks_honour_tryfirst_and_trylast(tiny, tmp_path):
    log: list[str] = []

    def plugin(tag, **order):
        class Ordered:
            @stagewise.hookimpl(**order)
            def stagewise_before_stage(self, stage):
                log.append(f"{tag} before")

            @stagewise.hookimpl(**order)
            def stagewise_after_stage(self, stage):
                log.append(f"{tag} after")
        return Ordered()

    names = {"last": {"trylast": True}, "a": {}, "first": {"tryfirst": True}, "b": {}}
    for name, order in names.items():
        plugins.register_plugin(plugin(name, **order), f"order-{name}")
    try:
        run_recipe(tiny("stages.phase1.max_epochs=1"), out=tmp_path / "run", quiet=True)
    finally:
        for name in names:
            plugins.unregister_plugin(f"order-{name}")
    assert log[:4] == ["first before", "a before", "b before", "last before"]
    assert log[4:8] == ["first after", "b after", "a after", "last after"]  # plain ones reversed


def test_a_wrapper_event_hook_is_refused_before_the_run_writes(tiny, tmp_path):
    class Wrapper:
        @stagewise.hookimpl(wrapper=True)
        def stagewise_before_stage(self, state):
            return (yield)

    plugins.register_plugin(Wrapper(), "wrapper")
    try:
        with pytest.raises(stagewise.PluginError, match=r"plugin 'wrapper': stagewise_before_stage\(state, stage\) "
                                                         r"is a wrapper"):
            run_recipe(tiny(), out=tmp_path / "run", quiet=True)
    finally:
        plugins.unregister_plugin("wrapper")
    assert not (tmp_path / "run").exists()


def test_router_state_is_what_calibrate_learned_and_an_empty_branch_has_ratio_0():
    import dataclasses

    import torch

    @dataclasses.dataclass
    class QuantileOptions:
        hard_ratio: float = 0.5

    class LossRouter(stagewise.Router):
        name = "hooktest.loss_quantile"
        Options = QuantileOptions

        def calibrate(self, scores):
            self.threshold = float(torch.quantile(scores, 1 - self.options.hard_ratio))
            return {"threshold": self.threshold}

        def route(self, scores):
            hard = scores > self.threshold
            return stagewise.Routing(masks={"hard": hard, "easy": ~hard}, scores=scores)

    router = LossRouter()
    router.calibrate(torch.tensor([1.0, 2.0, 3.0]))
    assert router.state_dict() == {"threshold": 2.0}  # options come from the recipe, not the checkpoint
    restored = LossRouter(QuantileOptions(hard_ratio=0.1))
    restored.load_state_dict(router.state_dict())
    assert restored.threshold == 2.0 and restored.options.hard_ratio == 0.1
    assert restored.route(torch.tensor([1.0, 4.0, 5.0, 2.0])).ratio("hard") == 0.5
    assert restored.route(torch.tensor([])).ratio("hard") == 0.0  # not nan: nothing was routed there


def test_a_stage_made_without_a_label_is_labelled_by_its_name():
    from stagewise.builtins.evaluate import EvaluateStage

    assert EvaluateStage().label == "stagewise.evaluate"
    assert EvaluateStage(label="final").label == "final"
