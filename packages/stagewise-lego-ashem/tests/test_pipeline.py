"""The recipes end to end on a tiny model: golden numbers, determinism, freezing, errors,
progress bars, the calibration pass, phase 2's view of the cache and the leak warning."""

from __future__ import annotations

import io
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, read_summary

import stagewise
from stagewise.engine.checkpoint import load_checkpoint
from stagewise.engine.runner import run_recipe
from stagewise.errors import ConfigError
from stagewise.loss import token_nll
from stagewise.recipe import load_recipe, recipe_from_table
from stagewise.verify import verify_run
from stagewise_lego_ashem.timing import TIMING_METRICS

GOLDEN = Path(__file__).parent / "golden"


def deterministic(metrics: dict) -> dict:
    """The metrics that must repeat bit for bit: all but wall-clock measurements."""
    return {k: v for k, v in metrics.items() if k.rsplit("/", 1)[-1] not in TIMING_METRICS}


@pytest.mark.parametrize("mode", ["full", "token"])
def test_golden_record(tiny, tmp_path, mode):
    """Exact final metrics. A change here is a behaviour change: make it deliberately, say why."""
    run_dir = run_recipe(tiny(f"stages.phase2.context=\"{mode}\""), out=tmp_path / "run", quiet=True)
    assert verify_run(run_dir, GOLDEN / f"tiny_{mode}.json") == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("measure", ["max_prob", "probe"])
def test_the_pipeline_runs_on_cuda_to_its_cpu_figures(tiny, tmp_path, measure):
    # the goldens are CPU records; on a GPU the probe's curve quantiles crashed (a CPU q for CUDA scores)
    overrides = ["stages.phase2.max_epochs=1", "stages.test.measure_speed=true", "stages.test.curve_points=2"]
    if measure == "probe":
        overrides.append("model.exit_probe=true")
    runs = {}
    for device in ("cpu", "cuda"):
        table = tiny(*overrides, f"run.device={device}").table
        if measure == "probe":
            table["stages"].insert(3, {"name": "probe", "use": "lego_ashem.train_exit_probe", "epochs": 2})
        recipe = recipe_from_table(table, f"tiny on {device}", [])
        runs[device] = read_summary(run_recipe(recipe, out=tmp_path / device, quiet=True))["metrics"]
    cpu, gpu = (deterministic(runs[device]) for device in ("cpu", "cuda"))
    assert set(gpu) == set(cpu) and runs["cuda"]["test/speedup_measured"] > 0
    for key in ("test/full_depth_ppl", "test/routed_ppl", "test/shallow_ratio", "test/compute_cost_flops"):
        assert gpu[key] == pytest.approx(cpu[key], rel=5e-2), key


def test_same_seed_gives_bit_identical_metrics(tiny, tiny_run, tmp_path):
    a = read_summary(tiny_run)["metrics"]
    b = read_summary(run_recipe(tiny(), out=tmp_path / "b", quiet=True))["metrics"]
    assert a == b and "test/routed_ppl" in a
    # the names stagewise.evaluate reports, so `stagewise compare` lines them up with lego_ashem.baseline's
    assert (a["test/loss"], a["test/ppl"]) == (a["test/routed_loss"], a["test/routed_ppl"]) and "test/acc" in a


def test_upper_layer_training_never_touches_frozen_parameters(tiny_run):
    before = load_checkpoint(tiny_run / "checkpoints" / "mine.pt")["model"]
    after = load_checkpoint(tiny_run / "checkpoints" / "phase2.pt")["model"]
    assert set(before) < set(after)
    for name, tensor in before.items():  # embedding, layers 0-1, norm, head, routing_threshold
        assert torch.equal(after[name], tensor), name


def _artifacts(run_dir: Path) -> dict[str, set[str]]:
    return {file.stem: set(load_checkpoint(file)["artifacts"]) for file in (run_dir / "checkpoints").glob("*.pt")}


def test_the_cache_is_checkpointed_only_until_the_last_stage_that_trains_from_it(tiny_run):
    cache = load_checkpoint(tiny_run / "checkpoints" / "mine.pt")["artifacts"]["lego_ashem.cache"]
    assert cache["hidden"].shape[-1] == 16
    router = {"lego_ashem.router"}  # after phase 2 the checkpoints keep the router alone, not a split's hidden states
    assert _artifacts(tiny_run) == {"phase1": set(), "mine": router | {"lego_ashem.cache"}, "phase2": router,
                                   "test": router, "last": router}


def test_a_second_stage_training_from_the_cache_finds_it(tmp_path):
    again = TINY.replace('[[stages]]\nname = "test"', '[[stages]]\nname = "phase2b"\n'
                         'use = "lego_ashem.train_upper_layers"\ntrain = ["layers.3.*"]\nmax_epochs = 1\n'
                         'max_steps_per_epoch = 2\nmeasure_speed = false\n\n[[stages]]\nname = "test"')
    path = tmp_path / "again.toml"
    path.write_text(again)
    run_dir = run_recipe(load_recipe(path), out=tmp_path / "run", quiet=True)
    artifacts = _artifacts(run_dir)
    assert "lego_ashem.cache" in artifacts["phase2"] and "lego_ashem.cache" not in artifacts["phase2b"]


def test_a_stage_followed_by_a_new_mine_lets_its_cache_go(tmp_path):
    from stagewise_lego_ashem.stages import _trains_from_cache_later

    mine2 = ('[[stages]]\nname = "mine2"\nuse = "lego_ashem.mine"\nrouter = { use = "lego_ashem.confidence" }\n'
             'calib_split = "valid"\nsplit = "train"\n')
    remine = TINY[:TINY.index('[[stages]]\nname = "test"')] + mine2
    path = tmp_path / "remine.toml"
    path.write_text(remine)
    recipe = load_recipe(path)
    assert [spec.use for spec in recipe.stages[2:]] == ["lego_ashem.train_upper_layers", "lego_ashem.mine"]
    assert _trains_from_cache_later(recipe, 2) is False  # the next mine replaces the cache before any stage reads it


def test_speed_metrics_are_reported_and_change_no_other_number(tiny, tmp_path):
    short = ("stages.phase2.max_epochs=1", "stages.test.curve_points=0")
    timed = tiny(*short, "stages.phase2.measure_speed=true", "stages.test.measure_speed=true")
    metrics = read_summary(run_recipe(timed, out=tmp_path / "timed", quiet=True))["metrics"]
    for name in ("phase2/phase2_cache_speedup", "phase2/phase2_cache_speedup_flops",
                 "phase2/phase2_token_mode_speedup", "test/speedup_measured", "test/batch_size",
                 "test/routed_ppl", "test/full_depth_ppl", "test/shallow_ratio", "test/compute_cost",
                 "test/compute_cost_flops", "test/hard_ppl_before", "test/hard_ppl_after"):
        assert metrics[name] > 0, name
    assert metrics["test/batch_size"] == 32
    assert metrics["test/confidence_ms"] > 0 and 0 < metrics["test/confidence_flops_share"] < 1  # max_prob
    plain = read_summary(run_recipe(tiny(*short), out=tmp_path / "plain", quiet=True))["metrics"]
    assert {k: metrics[k] for k in plain} == plain  # timing trains nothing and draws no random number
    assert set(deterministic(metrics)) - set(plain) == {
        "phase2/phase2_cache_speedup_flops", "phase2/phase2_token_mode_speedup_flops", "test/batch_size",
        "test/confidence_flops_share"}


def test_a_rerun_verifies_against_the_first_runs_summary_leaving_wall_clock_out(tiny, tmp_path, capsys):
    from stagewise.cli.main import main

    timed = tiny("stages.phase2.max_epochs=1", "stages.test.curve_points=0", "stages.phase2.measure_speed=true",
                 "stages.test.measure_speed=true")
    first, again = (run_recipe(timed, out=tmp_path / name, quiet=True) for name in ("first", "again"))
    stages = read_summary(first)["stages"]
    assert "phase2/phase2_cache_speedup" in stages["phase2"]["measured"]
    assert "phase2/phase2_cache_speedup_flops" not in stages["phase2"]["measured"]  # counted, not timed
    assert "test/speedup_measured" in stages["test"]["measured"] and stages["mine"]["measured"] == []
    assert main(["verify", str(again), str(first / "summary.json")]) == 0
    assert "verify: OK (12 wall-clock measurement(s) not compared" in capsys.readouterr().out


def test_exit_probe_replaces_the_exit_softmax(tiny, tmp_path):
    recipe = tiny("model.exit_probe=true", "stages.phase2.max_epochs=1",
                  "stages.test.measure_speed=false", "stages.test.curve_points=2")
    probe = {"name": "probe", "use": "lego_ashem.train_exit_probe", "epochs": 2}
    table = recipe.table
    table["stages"].insert(3, probe)
    from stagewise.recipe import recipe_from_table

    run_dir = run_recipe(recipe_from_table(table, "tiny+probe", []), out=tmp_path / "run", quiet=True)
    metrics = read_summary(run_dir)["metrics"]
    artifacts = load_checkpoint(run_dir / "checkpoints" / "last.pt")["artifacts"]
    assert artifacts["lego_ashem.router"]["measure"] == "probe"
    assert 0 <= metrics["probe/probe_acc"] <= 1 and metrics["test/threshold"] == metrics["probe/threshold"]
    assert 0 < metrics["test/shallow_ratio"] < 1
    assert verify_run(run_dir, GOLDEN / "tiny_probe.json") == []  # exact, as the max-softmax runs' records


def test_an_export_routes_with_numpy_as_the_run_did_with_torch(tiny, tmp_path):
    # was: the export held the weights only, so its user could not route (no measure, no exact threshold)
    import numpy as np

    from stagewise.export import export_npz, load_npz
    from stagewise_lego_ashem.router import confidence_from_logits

    table = tiny().table
    table["stages"] = table["stages"][:2]  # phase 1, mine
    from stagewise.recipe import recipe_from_table

    run_dir = run_recipe(recipe_from_table(table, "mine-only", []), out=tmp_path / "run", quiet=True)
    export_npz(run_dir / "checkpoints" / "mine.pt", tmp_path / "mine.npz")
    _, meta = load_npz(tmp_path / "mine.npz")
    threshold = read_summary(run_dir)["metrics"]["mine/threshold"]
    assert meta["routers"] == {"lego_ashem.router": {"use": "lego_ashem.confidence",
                                                     "options": {"measure": "max_prob", "hard_ratio": 0.5},
                                                     "state": {"threshold": float(np.float32(threshold))}}}
    model = stagewise.load_model(run_dir)
    with torch.no_grad():
        h = model.exit_hidden(torch.arange(64).view(4, 16) % model.config.vocab_size)
        scores = confidence_from_logits(model.logits_from_hidden(h), "max_prob")  # (4, 16) float32
    scores = torch.cat([scores.flatten(), torch.tensor([threshold], dtype=torch.float32)])  # one tie at float32
    torch_easy = (scores >= threshold).numpy()  # as Confidence.route compares
    exported = meta["routers"]["lego_ashem.router"]["state"]["threshold"]
    assert np.array_equal(scores.numpy() >= np.float64(exported), torch_easy)
    assert np.array_equal(scores.numpy() >= np.float32(exported), torch_easy)
    export_npz(run_dir / "checkpoints" / "phase1.pt", tmp_path / "phase1.npz")
    assert load_npz(tmp_path / "phase1.npz")[1]["routers"] == {}  # before mine: no router, said so


def test_a_stage_needing_the_cache_before_mine_fails_before_training(tiny, tmp_path):
    table = tiny().table
    table["stages"] = [s for s in table["stages"] if s["name"] != "mine"]
    from stagewise.recipe import recipe_from_table

    with pytest.raises(ConfigError, match="add a lego_ashem.mine stage before it") as error:
        run_recipe(recipe_from_table(table, "no-mine", []), out=tmp_path / "run", quiet=True)
    assert "routing threshold" in str(error.value)  # both stages that need mine say so
    assert not (tmp_path / "run").exists()  # nothing was trained or written


def test_recipe_errors_are_reported_before_anything_runs(tiny):
    with pytest.raises(ConfigError) as error:
        tiny("model.exit_layer=3", "stages.mine.router.hard_ratio=1.0")
    assert "outside the model" in str(error.value) and "strictly between 0 and 1" in str(error.value)


@pytest.mark.parametrize("stage", ["mine", "probe"])
def test_an_empty_calib_split_is_refused_before_anything_runs(tiny, tmp_path, stage):
    # found by fuzzing the option tables: mine's was a KeyError from the data after phase 1 had trained
    table = tiny("model.exit_probe=true").table
    if stage == "mine":
        table["stages"][1]["calib_split"] = ""
    else:  # a probe stage after phase 2
        table["stages"].insert(3, {"name": "probe", "use": "lego_ashem.train_exit_probe", "calib_split": ""})
    from stagewise.recipe import recipe_from_table

    with pytest.raises(ConfigError) as error:
        run_recipe(recipe_from_table(table, "no-calib", []), out=tmp_path / "run", quiet=True)
    assert error.value.problems == [f'stages.{stage}.calib_split: must name the split the threshold is calibrated '
                                    f'on (e.g. "valid"), got ""']
    assert not (tmp_path / "run").exists()


def test_a_router_key_set_on_its_stage_names_the_stage_and_the_router_table():
    # was: "stages[1].hard_ratio: unknown key. Valid keys: ..." for --set stages.mine.hard_ratio=2
    with pytest.raises(ConfigError) as error:
        load_recipe("lego_ashem.ashem", ["stages.mine.hard_ratio=2"])
    assert error.value.problems == [
        "stages.mine.hard_ratio: unknown key; did you mean stages.mine.router.hard_ratio (a key of the router "
        "table)? Valid keys: calib_split, checkpoint, grow, name, router, split, use"]


def test_the_plugin_s_checks_name_stages_as_set_addresses_them(tiny, tmp_path):
    table = tiny("stages.phase2.grow={n_layer=4, exit_layer=3}").table
    from stagewise.recipe import recipe_from_table

    with pytest.raises(ConfigError) as error:
        run_recipe(recipe_from_table(table, "moved-exit", []), out=tmp_path / "run", quiet=True)
    assert error.value.problems[0].startswith("stages.phase2: the model exits at layer 3 here but stages.mine "
                                              "(lego_ashem.mine) cached layer 2's states")


def test_evaluating_on_a_mined_split_is_refused_unless_the_leak_is_asked_for(tiny, tmp_path):
    with pytest.raises(ConfigError, match="'valid' is not held-out: stage 'mine' calibrated the threshold"):
        run_recipe(tiny("stages.test.split=\"valid\""), out=tmp_path / "run", quiet=True)


@pytest.mark.parametrize("name", ["lego_ashem.ashem", "lego_ashem.seed_protocol", "lego_ashem.baseline"])
def test_shipped_recipes_validate(name):
    recipe = load_recipe(name)
    assert recipe.stages and recipe.model.use == "lego_ashem.deep_supervision_transformer"
    assert str(stagewise.get_recipe(name)).endswith(".toml")


def test_ashem_and_baseline_are_comparable():
    from stagewise.compare import check_comparable

    check_comparable([load_recipe("lego_ashem.baseline"), load_recipe("lego_ashem.ashem")])


@pytest.mark.parametrize(("override", "message"), [
    ("stages.test.speed_repeats=0",
     r"stages.test.speed_repeats \(from --set stages.test.speed_repeats=0\): must be >= 1"),
    ("stages.test.curve_points=-1",
     r"stages.test.curve_points \(from --set stages.test.curve_points=-1\): must be >= 0"),
    ("stages.phase2.speed_repeats=0",
     r"stages.phase2.speed_repeats \(from --set stages.phase2.speed_repeats=0\): must be >= 1"),
])
def test_bad_speed_and_curve_options_are_refused_when_the_recipe_loads(tiny, override, message):
    with pytest.raises(ConfigError, match=message):
        tiny(override)


@pytest.mark.parametrize(("lr", "message"), [
    # was: accepted; the probe diverged and the router blamed "the earlier stages' lr" after phase 2 trained
    (math.inf, "must be a finite number > 0, got inf"),
    # was: a RuntimeError from AdamW ("value cannot be converted to type float without overflow")
    (1e300, "must be <= 1e+30 (torch's optimizers overflow float32 above it), got 1e+300"),
])
def test_a_probe_lr_torch_cannot_take_is_refused_before_anything_runs(tiny, tmp_path, lr, message):
    table = tiny("model.exit_probe=true").table
    table["stages"].insert(3, {"name": "probe", "use": "lego_ashem.train_exit_probe", "lr": lr})
    from stagewise.recipe import recipe_from_table

    with pytest.raises(ConfigError) as info:
        run_recipe(recipe_from_table(table, "tiny.toml", []), out=tmp_path / "run", quiet=True)
    assert info.value.problems == [f"stages.probe.lr: {message}"]
    assert not (tmp_path / "run").exists()


def test_train_upper_layers_reports_its_own_and_stagewise_train_s_problems_at_once(tiny):
    # was: "stages.phase2: lr must be ...", and speed_repeats only once lr was fixed
    with pytest.raises(ConfigError) as info:
        tiny("stages.phase2.speed_repeats=0", "stages.phase2.lr=-1", 'stages.phase2.context="all"')
    assert info.value.problems == [
        "stages.phase2.context: 'all' is not one of the valid choices: 'full', 'token'",
        "stages.phase2.lr: must be a finite number >= 0, got -1.0",
        "stages.phase2.speed_repeats: must be >= 1, got 0"]


@pytest.mark.parametrize(("override", "message"), [
    ("stages.phase2.grow={n_layer=4, exit_layer=3}", "cached layer 2's states"),
    ("stages.phase2.losses=[{use=\"stagewise.cross_entropy\", at_layer=4}]", "needs exit-layer logits"),
])
def test_phase2_settings_the_cache_cannot_serve_are_refused_before_anything_runs(tiny, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        run_recipe(tiny(override), out=tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()


def test_the_curve_without_calibration_quantiles_is_refused_before_anything_runs(tiny, tmp_path):
    table = tiny().table
    table["model"]["n_layer"] = 4
    table["model"]["routing_threshold"] = 0.05
    table["stages"] = [table["stages"][0], table["stages"][3]]  # phase 1, then routed eval at a set threshold
    from stagewise.recipe import recipe_from_table

    with pytest.raises(ConfigError, match="set curve_points = 0"):
        run_recipe(recipe_from_table(table, "set-threshold", []), out=tmp_path / "run", quiet=True)
    table["stages"][1]["curve_points"] = 0
    summary = read_summary(run_recipe(recipe_from_table(table, "set-threshold", []), out=tmp_path / "ok", quiet=True))
    assert summary["metrics"]["test/threshold"] == pytest.approx(0.05)


def test_evaluating_where_the_probe_was_fitted_is_refused(tiny, tmp_path):
    table = tiny().table
    table["model"]["exit_probe"] = True
    table["stages"].insert(3, {"name": "probe", "use": "lego_ashem.train_exit_probe", "split": "test",
                               "calib_split": "valid"})
    from stagewise.recipe import recipe_from_table

    with pytest.raises(ConfigError, match="'test' is not held-out: stage 'probe' fitted the exit probe"):
        recipe = recipe_from_table(table, "probe-on-test", [])
        run_recipe(recipe, out=tmp_path / "run", quiet=True)


def test_a_cache_without_hard_tokens_says_there_is_nothing_to_train(tiny):
    """... in the recipe file's voice, naming the key to raise: the mine stage's router.hard_ratio."""
    from types import SimpleNamespace

    from stagewise_lego_ashem import mining
    from stagewise_lego_ashem.stages import TrainUpperLayers

    recipe = tiny()
    stage = TrainUpperLayers(label="phase2")
    cache = {"split": "train", "exit_layer": 2, "hidden": torch.zeros(3, 4, 8), "target": torch.zeros(3, 4),
             "hard": torch.zeros(3, 4, dtype=torch.bool)}
    state = SimpleNamespace(artifacts={mining.CACHE: cache}, resumed_from=None, recipe=recipe, stage_index=2)
    with pytest.raises(ConfigError, match="'train' holds no hard token.*raise the router's hard_ratio") as caught:
        stage.run(state)
    assert str(caught.value).startswith(f"{recipe.source}: 1 problem")
    assert "stages.phase2: " in str(caught.value) and "(stages.mine.router.hard_ratio)" in str(caught.value)


def test_mine_reports_the_calibrated_hard_ratio_on_the_calibration_split(tiny, tmp_path):
    """At hard_ratio 0.25 (not 0.5, where hard and easy shares coincide) a quarter of the
    calibration tokens come out hard; the mined split's counts agree with its ratio. The curve's
    quantiles are the calibration split's too: the 0.25 one is the threshold."""
    table = tiny("stages.mine.router.hard_ratio=0.25").table
    table["stages"] = table["stages"][:2]  # phase 1, mine
    from stagewise.recipe import recipe_from_table

    run_dir = run_recipe(recipe_from_table(table, "mine-only", []), out=tmp_path / "run", quiet=True)
    metrics = read_summary(run_dir)["metrics"]
    assert metrics["mine/calib_hard_ratio"] == pytest.approx(0.25, abs=0.01)
    quantiles = load_checkpoint(run_dir / "checkpoints" / "mine.pt")["artifacts"]["lego_ashem.router"]["quantiles"]
    assert quantiles[5] == pytest.approx(metrics["mine/threshold"], rel=1e-9)  # quantile 5 of 0..20: 0.25
    assert metrics["mine/hard_tokens"] == round(metrics["mine/hard_ratio"] * metrics["mine/tokens"])
    assert metrics["mine/mean_hard_confidence"] < metrics["mine/threshold"]


def test_phase2_without_a_layer_above_the_exit_is_refused_before_anything_runs(tiny, tmp_path):
    table = tiny().table
    del table["stages"][2]["grow"]  # phase 2 on the 2-layer model that exits at layer 2
    table["stages"][2]["train"] = ["layers.1.*"]
    from stagewise.recipe import recipe_from_table

    with pytest.raises(ConfigError, match="no layer above exit_layer 2 .n_layer 2."):
        run_recipe(recipe_from_table(table, "no-grow", []), out=tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("train", ['["layers.1.*"]', '["embedding.*", "layers.0.*"]'])
def test_phase2_training_only_what_the_cache_skips_is_refused_before_anything_runs(tiny, tmp_path, train):
    # was: RuntimeError "element 0 of tensors does not require grad" from backward, after RUN_DIR existed
    with pytest.raises(ConfigError, match=r"stages\.phase2\.train .* never runs .*train = \[\"layers\.2\.\*\"\]"):
        run_recipe(tiny(f"stages.phase2.train={train}"), out=tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()


def test_phase2_training_only_the_first_block_above_the_exit_is_accepted(tiny):
    """Blocks are counted from 0: with exit_layer 2 the cache holds the output of blocks 0 and 1,
    and block 2 is the first that a step from the cache runs."""
    from stagewise.engine.runner import check_stages

    recipe = tiny('stages.phase2.train=["layers.2.*"]')
    check_stages(recipe, recipe.data.component().from_recipe(recipe.data.options, seed=0))


# --- fuzzing findings: each was accepted, or failed mid-run --------------------------------------

@pytest.mark.parametrize("override", ['stages.mine.split=""', 'stages.test.split=""'])
def test_an_empty_split_name_is_refused_before_anything_runs(tiny, tmp_path, override):
    # was: KeyError "no split named ''" traceback from state.batches, after RUN_DIR existed
    with pytest.raises(ConfigError, match="split"):
        run_recipe(tiny(override), out=tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()


def test_curve_points_above_the_calibration_quantiles_are_refused(tiny):
    # documented "at most 21"; 22 and 100 were accepted, 10**12 hung the test stage
    with pytest.raises(ConfigError, match="curve_points"):
        tiny("stages.test.curve_points=22")


def test_a_finished_run_generates_text_as_the_readme_shows(tiny_run):
    import stagewise
    from stagewise.data import Vocabulary
    from stagewise_lego_ashem import load_router
    from stagewise_lego_ashem.model import DeepSupervisionTransformer
    from stagewise_lego_ashem.routed import generate_routed

    model = stagewise.load_model(tiny_run)  # the README's snippet, step by step
    router = load_router(tiny_run)
    vocab = Vocabulary.from_file(tiny_run / "vocab.txt")
    saved = load_checkpoint(tiny_run / "checkpoints" / "last.pt")
    out = generate_routed(model, torch.tensor([vocab.encode("the old man said".split())]), 5, router,
                          router.threshold)
    assert isinstance(model, DeepSupervisionTransformer) and not model.training
    assert (len(model.layers), model.exit_layer) == (saved["model_options"]["n_layer"], 2)  # grown, exit kept
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved["model"].items())
    assert len(vocab.decode(out["tokens"][0].tolist()).split()) == 4 + 5


# --- progress, the calibration pass, the probe's loss, the leak warning ------------------------


class Terminal(io.StringIO):
    """A stderr that says it is a terminal, so that progress bars are drawn into it."""

    def isatty(self):
        return True


def _with_probe(recipe):
    """The tiny recipe with a probe stage after phase 2 (its evaluation then routes by the probe)."""
    from stagewise.recipe import recipe_from_table

    table = recipe.table
    table["model"]["exit_probe"] = True
    table["stages"].insert(3, {"name": "probe", "use": "lego_ashem.train_exit_probe", "epochs": 2})
    return recipe_from_table(table, "tiny+probe", [])


def test_long_stages_show_progress_on_a_terminal_only_without_quiet_and_change_no_number(tiny, tmp_path,
                                                                                          monkeypatch):
    recipe = _with_probe(tiny("stages.phase2.max_epochs=1", "stages.test.measure_speed=true"))
    stderr, runs = {}, (("bar", False, Terminal()), ("quiet", True, Terminal()), ("log", False, io.StringIO()))
    for name, quiet, terminal in runs:
        monkeypatch.setattr(sys, "stderr", terminal)
        run_recipe(recipe, out=tmp_path / name, quiet=quiet)
        # without matplotlib each run also says once why it draws no plot (also with --quiet): not a bar
        stderr[name] = "".join(line for line in terminal.getvalue().splitlines(keepends=True)
                               if not line.startswith("stagewise: hint: matplotlib is not installed"))
    for bar in ("mine: calibrate on valid", "mine: cache train", "probe: exit states of train",
                "probe: calibrate on valid", "test: evaluate test", "test: curve point 3/3",
                "test: time full depth vs routed"):
        assert bar in stderr["bar"], bar
    assert stderr["quiet"] == stderr["log"] == ""  # --quiet, or stderr not a terminal (a log file, a test)
    metrics = [deterministic(read_summary(tmp_path / name)["metrics"]) for name in stderr]
    assert metrics[0] == metrics[1] == metrics[2]


def test_mine_takes_no_loss_on_the_calibration_split(tiny, tmp_path, monkeypatch):
    """The calibration needs the confidences alone; the exit layer's loss is taken on the mined
    split only (for mine/hard_ppl)."""
    from stagewise.recipe import recipe_from_table
    from stagewise_lego_ashem import mining

    tokens = []

    def counted(logits, target):
        tokens.append(target.numel())
        return token_nll(logits, target)

    monkeypatch.setattr(mining, "token_nll", counted)
    table = tiny().table
    table["stages"] = table["stages"][:2]  # phase 1, mine
    metrics = read_summary(run_recipe(recipe_from_table(table, "mine-only", []), out=tmp_path / "run",
                                      quiet=True))["metrics"]
    assert sum(tokens) == metrics["mine/tokens"]


def test_phase2_datasets_read_the_cache_without_copying_it():
    from stagewise_lego_ashem.mining import SequenceCache, TokenCache

    hidden = torch.randn(3, 4, 2, generator=torch.Generator().manual_seed(17))
    hard = torch.tensor([[False, True, False, True], [False] * 4, [True, False, False, False]])
    cache = {"hidden": hidden, "target": torch.arange(12).view(3, 4), "hard": hard}
    windows, tokens = SequenceCache(cache), TokenCache(cache)
    assert len(windows) == 2 and torch.equal(windows[1]["hidden"], hidden[2])
    assert len(tokens) == 3 and [int(tokens[j]["target"]) for j in range(3)] == [1, 3, 8]  # row-major
    assert torch.equal(torch.cat([tokens[j]["hidden"] for j in range(3)]), hidden[hard])
    storage = hidden.untyped_storage().data_ptr()  # items are views of the cache: phase 2 holds it once
    assert [item["hidden"].untyped_storage().data_ptr() == storage for item in (windows[0], tokens[0])] == [True] * 2


def test_phase2_batches_load_with_one_gather_per_tensor_bit_for_bit(monkeypatch):
    # a token-mode batch cost 32 item lookups (~0.5 ms a step on the embedded corpus); now a few gathers
    from torch.utils.data import default_collate

    from stagewise.engine.batches import in_process_batches
    from stagewise_lego_ashem.mining import SequenceCache, TokenCache

    hidden = torch.randn(4, 3, 2, generator=torch.Generator().manual_seed(3))
    hard = torch.tensor([[True, False, True], [False] * 3, [True, True, False], [False, False, True]])
    cache = {"hidden": hidden, "target": torch.arange(12).view(4, 3), "hard": hard}
    for dataset, indices in ((SequenceCache(cache), [2, 0]), (TokenCache(cache), [4, 0, 3, 1])):
        expected = default_collate([dataset[i] for i in indices])
        monkeypatch.setattr(type(dataset), "__getitem__", lambda self, i: pytest.fail("an item looked up alone"))
        (got,) = in_process_batches(dataset, [indices])
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) and got[k].dtype == expected[k].dtype for k in got)


def test_reporting_on_a_mined_split_warns_once_that_its_numbers_are_not_held_out(tiny, tmp_path, capsys):
    short = ("stages.phase2.max_epochs=1", "stages.test.curve_points=2")
    leaky = read_summary(run_recipe(tiny(*short, 'stages.test.split="train"', "stages.test.allow_leak=true"),
                                    out=tmp_path / "leak", quiet=True))  # --quiet keeps warnings
    err = capsys.readouterr().err
    assert err.count("stagewise: warning:") == 1
    assert ("stagewise: warning: stage 'test' reports on split 'train', where stage 'mine' mined the phase-2 "
            "cache (allow_leak = true): its numbers are not held-out" in err)
    assert leaky["stages"]["test"]["metrics"]["warnings/not_held_out"] == 1
    held_out = read_summary(run_recipe(tiny(*short), out=tmp_path / "held-out", quiet=True))
    assert "stagewise: warning:" not in capsys.readouterr().err
    assert not any(k.startswith("warnings/") for k in held_out["metrics"])


def test_a_term_the_cache_cannot_serve_is_named_as_set_addresses_it(tiny, tmp_path):
    # was: stages.phase2.losses[1]: the user counted the stage's loss tables to find the term meant
    terms = '[{use="stagewise.cross_entropy"}, {use="stagewise.cross_entropy", name="deep", at_layer=4}]'
    with pytest.raises(ConfigError) as info:
        run_recipe(tiny(f"stages.phase2.losses={terms}"), out=tmp_path / "run", quiet=True)
    (problem,) = info.value.problems
    assert problem.startswith("stages.phase2.losses.deep: stagewise.cross_entropy needs exit-layer logits")


@pytest.mark.parametrize(("overrides", "problems"), [
    (["stages.mine.router.measure=probe"], ["stages.mine.router.measure: mine with a softmax measure; the probe is "
                                           "trained later by lego_ashem.train_exit_probe"]),
    (['model={use="stagewise.transformer", n_layer=2, n_embd=16, n_head=2, ffn_hidden=32}'],
     [f"stages.{name}: {use} needs [model] use = \"lego_ashem.deep_supervision_transformer\", got "
      "'stagewise.transformer'" for name, use in [("mine", "lego_ashem.mine"),
                                                  ("phase2", "lego_ashem.train_upper_layers"),
                                                  ("test", "lego_ashem.evaluate_routed")]]),
])
def test_a_mine_measure_or_model_the_stages_cannot_use_is_refused_before_anything_runs(tiny, tmp_path, overrides,
                                                                                       problems):
    with pytest.raises(ConfigError) as info:
        run_recipe(tiny(*overrides), out=tmp_path / "run", quiet=True)
    assert info.value.problems == problems
    assert not (tmp_path / "run").exists()
