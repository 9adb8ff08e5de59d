"""Bad options fail with clear errors before anything trains."""

from __future__ import annotations

import pytest
from conftest import TINY_HYBRID, TRAIN_ONLY, run_tiny, tiny_recipe
from stagewise_koopman.loss import KoopmanOptions

import stagewise


@pytest.mark.parametrize(("options", "message"), [
    ({"koopman_dim": 0}, "koopman_dim: must be a positive integer, got 0"),
    ({"koopman_dim": -4}, "koopman_dim: must be a positive integer, got -4"),
    ({"axis": "width"}, "axis: must be one of 'depth', 'time', got 'width'"),
    ({"distance": "l3"}, "distance: must be one of 'mse', 'smooth_l1', got 'l3'"),
    ({"steps": 0}, "steps: must be >= 1, got 0"),
    ({"detach": "both"}, "detach: must be one of 'none', 'source', 'target', got 'both'"),
    ({"dmd_rate": 0.0}, "dmd_rate: must be in (0, 1], got 0.0"),
    ({"dmd_every": -1}, "dmd_every: must be >= 0 (0: no DMD refresh), got -1"),
    ({"lifted_weight": 0, "reconstruction_weight": 0, "state_weight": 0, "spectral_weight": 0},
     "at least one of lifted_weight, reconstruction_weight, state_weight and spectral_weight must be > 0"),
    ({"koopman_dim": 8, "dmd_every": 2, "dmd_buffer": 7},
     "dmd_buffer (7) must be >= koopman_dim (8) when dmd_every > 0"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        KoopmanOptions(**options)


def test_recipe_validation_reports_every_bad_key_at_once():
    bad = TINY_HYBRID.replace("koopman_dim = 8\n", 'koopman_dim = 0\naxis = "sideways"\n').replace(
        "ramp_epochs = 2\n", "ramp_epochs = 2\ncap = -0.1\n")
    with pytest.raises(stagewise.ConfigError) as info:
        tiny_recipe(bad)
    text = str(info.value)
    assert "stages.main.losses.koopman" in text
    assert "stages.main.losses.koopman.koopman_dim: must be a positive integer, got 0" in text
    assert "stages.main.losses.koopman.axis: must be one of 'depth', 'time', got 'sideways'" in text
    # the engine's key of the term, in the same round as its options' problems (was: the next round)
    assert "stages.main.losses.koopman.cap: must be >= 0 and finite, got -0.1" in text


def test_negative_cap_is_refused_by_the_engine():
    with pytest.raises(stagewise.ConfigError,
                       match=r"stages\.main\.losses\.koopman\.cap: must be >= 0 and finite, got -0\.1"):
        tiny_recipe(TINY_HYBRID.replace("ramp_epochs = 2\n", "ramp_epochs = 2\ncap = -0.1\n"))


def test_layers_out_of_range_fail_before_anything_runs(tmp_path):
    bad = TINY_HYBRID.replace("steps = 2\n", "steps = 2\nlayers = [0, 3]\n")
    with pytest.raises(stagewise.ConfigError,
                       match=r"stages\.main\.losses\.koopman: layers \[3\] are out of range for axis 'depth'.*up to 2"):
        run_tiny(tmp_path / "run", bad)
    assert not (tmp_path / "run").exists()  # not even the warmup stage ran


@pytest.mark.parametrize(("overrides", "message"), [
    (["stages.main.losses.koopman.dmd_buffer=1000000000"],
     r"stages\.main\.losses\.koopman: koopman_dim = 8 and dmd_buffer = 1000000000 need 179 GiB for the operators of "
     r"3 source layers of width 16 alone, more than this machine's 4 GiB; lower them"),
    (["stages.linearity.fit.koopman_dim=100000"],
     r"stages\.linearity\.fit: koopman_dim = 100000 need 224 GiB for the operators of 3 source layers"),
])
def test_operators_larger_than_the_memory_fail_before_anything_runs(tmp_path, monkeypatch, overrides, message):
    # was: a TrainingError ("asked for 89.4 GiB at once") once the stages before had trained
    monkeypatch.setattr("stagewise.nn.transformer.physical_memory_gib", lambda: 4.0)
    with pytest.raises(stagewise.ConfigError, match=message):
        run_tiny(tmp_path / "run", overrides=overrides)
    assert not (tmp_path / "run").exists()


def test_forward_eval_needs_an_earlier_koopman_term():
    no_term = TINY_HYBRID.replace('name = "koopman"\n', 'name = "other"\n')
    with pytest.raises(stagewise.ConfigError, match="no earlier stage trains a koopman.operator term named 'koopman'"):
        from stagewise.engine.runner import check_stages

        recipe = tiny_recipe(no_term)
        check_stages(recipe, recipe.data.component().from_recipe(recipe.data.options, seed=0))


def test_forward_eval_needs_a_term_an_earlier_stage_trains_not_one_it_only_evaluates():
    # was: accepted, then "TypeError: 'NoneType' object is not subscriptable" once the stages before had run,
    # since only a training stage's terms reach state.artifacts
    main = 'name = "main"\nuse = "stagewise.train"\nlr = 1e-2\nmax_epochs = 3\nmax_steps_per_epoch = 3\n'
    assert main in TINY_HYBRID
    evaluated = TINY_HYBRID.replace(main, 'name = "main"\nuse = "stagewise.evaluate"\nsplit = "valid"\n')
    with pytest.raises(stagewise.ConfigError, match=r"no earlier stage trains a koopman.operator term named "
                                                    r"'koopman' \(found: none\)"):
        from stagewise.engine.runner import check_stages

        recipe = tiny_recipe(evaluated)
        check_stages(recipe, recipe.data.component().from_recipe(recipe.data.options, seed=0))


def test_a_term_with_only_the_spectral_part_or_a_small_buffer_without_dmd_is_accepted():
    KoopmanOptions(lifted_weight=0, reconstruction_weight=0, state_weight=0, spectral_weight=0.1)
    KoopmanOptions(koopman_dim=8, dmd_buffer=4)  # the buffer is unused while dmd_every is 0


@pytest.mark.parametrize(("overrides", "message"), [
    (["stages.main.losses.koopman.layers=[2]"],  # steps = 2: h_4 does not exist
     r"stages\.main\.losses\.koopman: steps 2 reaches past the last hidden state h_3 .* steps must be <= 1"),
    (["stages.main.losses.koopman.layers=[0]", "stages.main.losses.koopman.steps=5"],
     r"stages\.main\.losses\.koopman: steps 5 .* steps must be <= 3"),
    (["stages.forward.replace_layers=1", "stages.main.losses.koopman.layers=[0]"],
     r"stages\.forward\.replace_layers \(from --set stages\.forward\.replace_layers=1\): "
     r"replacing the last 1 of 3 blocks needs the operator of term 'koopman' "
     r"from layer 2, but its source layers are \[0\]; replace_layers can be: 3"),
    (["stages.forward.replace_layers=9"],
     r"stages\.forward\.replace_layers \(from --set stages\.forward\.replace_layers=9\): 9 is more than the "
     r"model's 3 blocks; .* replace_layers can be: 1, 2, 3"),
    (['stages.main.losses.koopman.axis="time"'],
     r"stages\.forward\.replace_layers: Koopman forward mode needs a term with axis 'depth'"),
    (["stages.linearity.fit.layers=[7]"],
     r"stages\.linearity\.fit: layers \[7\] are out of range for axis 'depth'.*up to 2"),
    (['stages.linearity.fit={axis="time", steps=8}'],
     r"stages\.linearity\.fit \(from --set stages\.linearity\.fit=\{axis=\"time\", steps=8\}\): "
     r"steps 8 must be below the sequence length 8 for axis 'time'"),
    (["stages.linearity.fit.dmd_every=2"],
     r"stages\.linearity\.fit\.dmd_every \(from --set stages\.linearity\.fit\.dmd_every=2\): must be 0"),
    (["stages.linearity.lr=nan"],
     r"stages\.linearity\.lr \(from --set stages\.linearity\.lr=nan\): must be a finite number > 0, got nan"),
    # was: a RuntimeError from Adam ("value cannot be converted to type float without overflow") after training
    (["stages.linearity.lr=1e300"],
     r"stages\.linearity\.lr \(from --set stages\.linearity\.lr=1e300\): must be <= 1e\+30"),
])
def test_settings_that_only_a_later_stage_would_trip_on_fail_before_anything_runs(tmp_path, overrides, message):
    with pytest.raises(stagewise.ConfigError, match=message):
        run_tiny(tmp_path / "run", overrides=overrides)
    assert not (tmp_path / "run").exists()


# --- fuzzing findings: each was accepted, or failed mid-run with a traceback ---------------

@pytest.mark.parametrize(("overrides", "key"), [
    # accepted (NaN passes `min(...) >= 0`): the term is NaN, its batches are skipped
    (["stages.main.losses.koopman.reconstruction_weight=nan"], "reconstruction_weight"),
    (["stages.main.losses.koopman.state_weight=nan"], "state_weight"),
    (["stages.main.losses.koopman.lifted_weight=inf"], "lifted_weight"),
    # was: torch._C._LinAlgError from linalg.svd in koopman.linearity's fit, after RUN_DIR exists
    (["stages.linearity.fit.spectral_weight=nan"], "spectral_weight"),
    (["stages.linearity.fit.spectral_weight=inf"], "spectral_weight"),
    # was accepted: no term value is <= nan, so the engine cut the weight of every batch
    (["stages.main.losses.koopman.fallback_threshold=nan"], "fallback_threshold"),
    # was accepted: the post-hoc fit diverges
    (["stages.linearity.lr=inf"], "lr"),
    # was: KeyError "no split named ''" traceback mid-run
    (['stages.forward.split=""'], "split"),
    (['stages.linearity.split=""'], "split"),
    (['stages.linearity.fit_split=""'], "fit_split"),
])
def test_fuzzed_values_are_refused_before_anything_runs(tmp_path, overrides, key):
    with pytest.raises(stagewise.ConfigError) as info:
        run_tiny(tmp_path / "run", overrides=overrides)
    assert not (tmp_path / "run").exists()
    assert any(key in p for p in info.value.problems), info.value.problems


def test_a_term_too_big_to_allocate_stops_its_stage_with_a_clear_error(tmp_path, monkeypatch):
    # was: RuntimeError "DefaultCPUAllocator: can't allocate memory" traceback from the term's constructor.
    # Where the machine's memory is known the recipe is refused before anything runs (see
    # test_operators_larger_than_the_memory_fail_before_anything_runs); here the platform does not say
    monkeypatch.setattr("stagewise.nn.transformer.physical_memory_gib", lambda: None)
    with pytest.raises(stagewise.TrainingError, match=r"^stage 'main' \(stagewise\.train\) asked for \S+ GiB "
                                                      r"at once, more memory than this machine has; lower its sizes"):
        run_tiny(tmp_path / "run", overrides=["stages.main.losses.koopman.koopman_dim=1000000000000",
                                                      "stages.main.losses.koopman.dmd_every=0"])
    assert (tmp_path / "run" / "checkpoints" / "warmup.pt").is_file()  # the stage before it is kept


def test_a_bad_part_weight_is_named_with_its_value():
    with pytest.raises(ValueError, match=r"^lifted_weight: must be >= 0 and finite, got -1\.0; "
                       r"state_weight: must be >= 0 and finite, got nan$"):
        KoopmanOptions(lifted_weight=-1.0, state_weight=float("nan"))
    # was: accepted; the term was inf on every batch, each batch skipped (and warned) until max_nonfinite
    with pytest.raises(ValueError, match=r"^lifted_weight: must be at most 3\.403e\+38 \(the largest float32; "
                                         r"losses are float32\), got 1e\+300$"):
        KoopmanOptions(lifted_weight=1e300)


def test_a_term_refused_as_its_stage_starts_names_the_recipe_file(tmp_path):
    # steps against seq_len along time is known only when the stage starts
    overrides = ['stages.main.losses.koopman.axis="time"', "stages.main.losses.koopman.steps=8"]
    with pytest.raises(stagewise.ConfigError, match=r"^tiny_hybrid\.toml: 1 problem:\n  - stages\.main\.losses\."
                       r"koopman: steps 8 must be below the sequence length 8"):
        run_tiny(tmp_path / "run", TRAIN_ONLY, overrides)


def test_a_nested_table_s_type_problem_and_its_stage_s_value_problem_come_together():
    # was: only the type problem; fit_steps came the next round as "stages.linearity: fit_steps must be ..."
    with pytest.raises(stagewise.ConfigError) as info:
        tiny_recipe(overrides=['stages.linearity.fit.koopman_dim="x"', "stages.linearity.fit.dmd_every=2",
                               "stages.linearity.fit_steps=0"])
    # not reported: linearity's check of fit.dmd_every would judge a fit with koopman_dim at its default
    assert info.value.problems == [
        "stages.linearity.fit.koopman_dim: expected int, got str 'x'",
        "stages.linearity.fit_steps: must be >= 1, got 0"]


# 3e38: just under the largest part weight allowed (1e300 is refused before the run), still inf times any loss above 1.2
@pytest.mark.parametrize("overrides", [["stages.linearity.lr=1e30"], ["stages.linearity.fit.state_weight=3e38"]])
def test_a_post_hoc_fit_that_diverges_stops_its_stage(tmp_path, overrides):
    # was: the run ended as if measured, with linearity/one_step_error and fit_loss NaN
    with pytest.raises(stagewise.TrainingError, match=r"^koopman\.linearity: the post-hoc fit's loss is (nan|inf) "
                                                      r"at step \d+ of 5; lower its lr"):
        run_tiny(tmp_path / "run", overrides=overrides)
