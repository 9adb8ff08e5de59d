"""The routed forward, the router and per-token mining, on a small model with fixed weights."""

from __future__ import annotations

import math

import pytest
import torch

import stagewise
from stagewise.nn.transformer import TransformerConfig
from stagewise_lego_ashem.mining import exit_states
from stagewise_lego_ashem.model import DeepSupervisionOptions, DeepSupervisionTransformer
from stagewise_lego_ashem.routed import routed_forward, routed_layers
from stagewise_lego_ashem.router import Confidence, ConfidenceOptions, confidence_from_logits


def small_model(n_layer: int = 4, exit_layer: int = 2) -> DeepSupervisionTransformer:
    torch.manual_seed(0)
    config = TransformerConfig(vocab_size=40, n_layer=n_layer, n_embd=16, n_head=2, ffn_hidden=32)
    return DeepSupervisionTransformer(config, exit_layer=exit_layer).eval()


def calibrated(model, idx, **options) -> Confidence:
    router = Confidence(ConfidenceOptions(**options))
    with torch.no_grad():
        router.calibrate(router.score(model, model.exit_hidden(idx))[0])
    return router


def test_components_are_registered():
    assert stagewise.get_model("lego_ashem.deep_supervision_transformer") is DeepSupervisionTransformer
    assert stagewise.get_router("lego_ashem.confidence") is Confidence
    assert {"lego_ashem.mine", "lego_ashem.train_upper_layers", "lego_ashem.train_exit_probe",
            "lego_ashem.evaluate_routed"} <= set(stagewise.get_stages())
    assert {"lego_ashem.ashem", "lego_ashem.seed_protocol", "lego_ashem.baseline"} <= set(stagewise.get_recipes())


@pytest.mark.parametrize("exit_layer", [0, 3])
def test_exit_layer_outside_the_model_is_refused(exit_layer):
    with pytest.raises(ValueError, match="outside the model"):
        DeepSupervisionOptions(n_layer=2, exit_layer=exit_layer)


@pytest.mark.parametrize("hard_ratio", [0.0, 1.0, -0.1, 1.5])
def test_hard_ratio_outside_0_1_is_refused(hard_ratio):
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        ConfidenceOptions(hard_ratio=hard_ratio)


def test_confidence_measures():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]]))
    torch.testing.assert_close(confidence_from_logits(logits, "max_prob"), torch.tensor([0.7, 0.4]))
    torch.testing.assert_close(confidence_from_logits(logits, "margin"), torch.tensor([0.5, 0.05]))
    p = logits.exp()
    torch.testing.assert_close(confidence_from_logits(logits, "neg_entropy"), (p * p.log()).sum(-1))


def test_router_threshold_is_the_hard_ratio_quantile_and_is_its_state():
    router = Confidence(ConfidenceOptions(hard_ratio=0.25))
    assert router.calibrate(torch.arange(9.0)) == {"threshold": 2.0}
    assert router.route(torch.arange(9.0)).masks["hard"].tolist() == [True, True] + [False] * 7
    assert router.state_dict() == {"threshold": 2.0}


@pytest.mark.parametrize("exit_layer", [1, 2, 3, 4])
def test_changing_token_t_plus_1_never_changes_logits_at_t(exit_layer):
    model = small_model(exit_layer=exit_layer)
    idx = torch.randint(0, 40, (2, 10), generator=torch.Generator().manual_seed(1))
    router = calibrated(model, idx)
    for t in range(9):
        changed = idx.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 7) % 40
        with torch.no_grad():
            a = model(idx, exit_layers=range(1, 5))["exit_logits"]
            b = model(changed, exit_layers=range(1, 5))["exit_logits"]
            ra = routed_forward(model, idx, router, router.threshold)
            rb = routed_forward(model, changed, router, router.threshold)
        for layer in range(1, 5):
            assert torch.equal(a[layer][:, : t + 1], b[layer][:, : t + 1]), (layer, t)
        assert torch.equal(ra["easy"][:, : t + 1], rb["easy"][:, : t + 1])
        torch.testing.assert_close(ra["logits"][:, : t + 1], rb["logits"][:, : t + 1], rtol=0, atol=1e-6)


def test_routed_layers_equal_running_every_row_and_keeping_the_easy_ones():
    model = small_model()
    idx = torch.randint(0, 40, (3, 9), generator=torch.Generator().manual_seed(2))
    hard = torch.rand(3, 9, generator=torch.Generator().manual_seed(3)) < 0.5
    with torch.no_grad():
        h = model.exit_hidden(idx)
        expected = h
        for layer in range(2, 4):  # easy rows keep their exit state; their keys/values come from it
            expected = torch.where(hard[..., None], model.run_layers(expected, layer, layer + 1), expected)
        torch.testing.assert_close(routed_layers(model, h, hard, 2, 4), expected, rtol=0, atol=1e-6)


def test_routed_eval_equals_full_depth_when_every_token_is_hard():
    model, idx = small_model(), torch.randint(0, 40, (3, 9), generator=torch.Generator().manual_seed(4))
    out = routed_forward(model, idx, Confidence(), threshold=math.inf)
    assert not out["easy"].any()
    with torch.no_grad():
        assert torch.equal(out["logits"], model(idx)["logits"])


def test_routed_eval_equals_exit_layer_eval_when_every_token_is_easy():
    model, idx = small_model(), torch.randint(0, 40, (3, 9), generator=torch.Generator().manual_seed(5))
    out = routed_forward(model, idx, Confidence(), threshold=-math.inf)
    assert out["easy"].all()
    with torch.no_grad():
        assert torch.equal(out["logits"], model(idx, exit_layers=[2])["exit_logits"][2])


def test_mining_is_per_token_not_per_sequence():
    model = small_model(n_layer=2)
    idx = torch.randint(0, 40, (16, 12), generator=torch.Generator().manual_seed(6))
    router = calibrated(model, idx, hard_ratio=0.5)
    mined = exit_states(model, [{"input": idx, "target": idx.roll(-1, 1)}], router)
    hard = router.route(mined["scores"]).masks["hard"]
    assert hard.shape == (16, 12) and mined["hidden"].shape == (16, 12, 16)
    assert int(hard.sum()) == 96  # exactly half of the tokens ...
    assert hard.any(1).all() and not hard.all(1).any()  # ... while every sequence mixes hard and easy



@pytest.mark.parametrize("threshold", [math.inf, -math.inf, None])
def test_routed_generation_with_a_kv_cache_matches_the_routed_forward(threshold):
    """All hard: full depth; all easy: the exit layer; mixed: exited tokens' upper keys/values
    come from their exit state, exactly the rule of routed_forward."""
    from stagewise_lego_ashem.routed import generate_routed

    model = small_model()
    prompt = torch.randint(0, 40, (3, 4), generator=torch.Generator().manual_seed(7))
    router = calibrated(model, torch.randint(0, 40, (8, 12), generator=torch.Generator().manual_seed(8)))
    threshold = router.threshold if threshold is None else threshold
    out = generate_routed(model, prompt, 6, router, threshold)
    assert out["tokens"].shape == (3, 10) and torch.equal(out["tokens"][:, :4], prompt)
    whole = routed_forward(model, out["tokens"][:, :-1], router, threshold)
    assert torch.equal(out["easy"], whole["easy"])
    torch.testing.assert_close(out["logits"], whole["logits"], rtol=0, atol=1e-5)
    assert torch.equal(out["tokens"][:, 4:], out["logits"][:, 3:].argmax(-1))  # greedy
    if threshold == -math.inf:
        with torch.no_grad():
            exit_logits = model(out["tokens"][:, :-1], exit_layers=[2])["exit_logits"][2]
        torch.testing.assert_close(out["logits"], exit_logits, rtol=0, atol=1e-5)


def test_routed_generation_needs_a_new_token():
    from stagewise_lego_ashem.routed import generate_routed

    model = small_model()
    router = calibrated(model, torch.randint(0, 40, (8, 12), generator=torch.Generator().manual_seed(8)))
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        generate_routed(model, torch.zeros(1, 1, dtype=torch.long), 0, router, router.threshold)


def test_routed_training_applies_the_attention_dropout_of_core_blocks():
    """With the feed-forward's dropout out of the way, only the attention and residual dropouts
    can make a train-mode pass differ from an eval-mode one; easy rows never change."""
    torch.manual_seed(0)
    config = TransformerConfig(vocab_size=40, n_layer=4, n_embd=16, n_head=2, ffn_hidden=32, dropout=0.5)
    model = DeepSupervisionTransformer(config, exit_layer=2)
    for block in model.layers:
        block.ffn.dropout = torch.nn.Identity()
    h = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(1))
    hard = torch.tensor([[True, False, True, True, False, True]] * 2)
    with torch.no_grad():
        trained = routed_layers(model.train(), h, hard, 2, 4)
        evaluated = routed_layers(model.eval(), h, hard, 2, 4)
    assert not torch.allclose(trained[hard], evaluated[hard])
    assert torch.equal(trained[~hard], h[~hard]) and torch.equal(evaluated[~hard], h[~hard])


def test_the_sequence_cache_keeps_only_windows_with_a_hard_token():
    from stagewise_lego_ashem.mining import SequenceCache

    hard = torch.tensor([[False, True], [False, False], [True, True]])
    cache = SequenceCache({"hidden": torch.arange(3.0).view(3, 1, 1).expand(3, 2, 4), "target": torch.zeros(3, 2),
                           "hard": hard})
    assert len(cache) == 2 and cache.windows.tolist() == [0, 2]
    assert torch.equal(cache[1]["hard"], hard[2]) and float(cache[1]["hidden"][0, 0]) == 2.0
