"""The routed forward, the router and per-token mining, on a small model with fixed weights."""

from __future__ import annotations

import functools
import gc
import math
from types import SimpleNamespace

import pytest
import torch

import stagewise
from stagewise.nn.transformer import TransformerConfig
from stagewise_lego_ashem.mining import exit_scores, exit_states
from stagewise_lego_ashem.model import DeepSupervisionOptions, DeepSupervisionTransformer
from stagewise_lego_ashem.probe import probe_data
from stagewise_lego_ashem.routed import routed_forward, routed_layers, upper_forward
from stagewise_lego_ashem.router import Confidence, ConfidenceOptions, confidence_from_logits
from stagewise_lego_ashem.rows import collect_rows
from stagewise_lego_ashem.stages import mined_hard_ppl


def small_model(n_layer: int = 4, exit_layer: int = 2, exit_probe: bool = False) -> DeepSupervisionTransformer:
    torch.manual_seed(0)
    config = TransformerConfig(vocab_size=40, n_layer=n_layer, n_embd=16, n_head=2, ffn_hidden=32)
    return DeepSupervisionTransformer(config, exit_layer=exit_layer, exit_probe=exit_probe).eval()


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


def test_a_nan_routing_threshold_is_refused_before_the_run():
    # NaN is the buffer's "not set": taken from the recipe it would fail only when routing began
    with pytest.raises(ValueError, match="routing_threshold: NaN"):
        DeepSupervisionOptions(n_layer=2, routing_threshold=math.nan)
    assert DeepSupervisionOptions(n_layer=2, routing_threshold=-math.inf).routing_threshold == -math.inf


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
    mined = exit_states(model, [{"input": idx, "target": idx.roll(-1, 1)}], router, windows=16)
    hard = router.route(mined["scores"]).masks["hard"]
    assert hard.shape == (16, 12) and mined["hidden"].shape == (16, 12, 16)
    assert int(hard.sum()) == 96  # exactly half of the tokens ...
    assert hard.any(1).all() and not hard.all(1).any()  # ... while every sequence mixes hard and easy



def test_phase2_with_full_context_trains_the_logits_routed_inference_gives_hard_tokens():
    """context = "full": the upper layers see the cached windows, easy positions as keys/values
    from their exit state, so the hard tokens' logits are routed inference's; context = "token"
    (the seed's) runs each hard token alone, blind to the rest of its window."""
    model, idx = small_model(), torch.randint(0, 40, (3, 9), generator=torch.Generator().manual_seed(8))
    router = calibrated(model, idx, hard_ratio=0.5)
    with torch.no_grad():
        routed = routed_forward(model, idx, router, router.threshold)
        hard, h = ~routed["easy"], model.exit_hidden(idx)
        full = upper_forward(model, "full")({"hidden": h, "hard": hard})["logits"]
        torch.testing.assert_close(full, routed["logits"][hard], rtol=0, atol=1e-5)
        token = upper_forward(model, "token")({"hidden": h[hard].unsqueeze(1)})["logits"]
        other = h.clone()
        other[~hard] = 0  # another context around the same hard tokens
        assert torch.equal(upper_forward(model, "token")({"hidden": other[hard].unsqueeze(1)})["logits"], token)
        assert not torch.allclose(upper_forward(model, "full")({"hidden": other, "hard": hard})["logits"], full)


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


def test_routed_generation_with_the_probe_matches_the_routed_forward():
    """The probe makes no exit logits: each position's head runs once, on its own exit state."""
    from stagewise_lego_ashem.routed import generate_routed

    torch.manual_seed(0)
    config = TransformerConfig(vocab_size=40, n_layer=4, n_embd=16, n_head=2, ffn_hidden=32)
    model = DeepSupervisionTransformer(config, exit_layer=2, exit_probe=True).eval()
    router = calibrated(model, torch.randint(0, 40, (8, 12), generator=torch.Generator().manual_seed(8)),
                        measure="probe")
    prompt = torch.randint(0, 40, (3, 4), generator=torch.Generator().manual_seed(7))
    out = generate_routed(model, prompt, 6, router, router.threshold)
    whole = routed_forward(model, out["tokens"][:, :-1], router, router.threshold)
    assert 0 < int(out["easy"].sum()) < out["easy"].numel()  # both kinds of rows occur
    assert torch.equal(out["easy"], whole["easy"])
    torch.testing.assert_close(out["logits"], whole["logits"], rtol=0, atol=1e-5)


def test_routed_generation_needs_a_new_token():
    from stagewise_lego_ashem.routed import generate_routed

    model = small_model()
    router = calibrated(model, torch.randint(0, 40, (8, 12), generator=torch.Generator().manual_seed(8)))
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        generate_routed(model, torch.zeros(1, 1, dtype=torch.long), 0, router, router.threshold)


def dropout_passes(attention_dropout: float, residual_dropout: bool):
    """Train- and eval-mode routed passes of a dropout-0.5 model with the feed-forward's dropout
    out of the way, and the attention weights' and residual dropouts as given; with ``hard``."""
    torch.manual_seed(0)
    config = TransformerConfig(vocab_size=40, n_layer=4, n_embd=16, n_head=2, ffn_hidden=32, dropout=0.5)
    model = DeepSupervisionTransformer(config, exit_layer=2)
    for block in model.layers:
        block.ffn.dropout = torch.nn.Identity()
        block.attn.dropout = attention_dropout
        if not residual_dropout:
            block.attn.resid_dropout = torch.nn.Identity()
    h = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(1))
    hard = torch.tensor([[True, False, True, True, False, True]] * 2)
    with torch.no_grad():
        return routed_layers(model.train(), h, hard, 2, 4), routed_layers(model.eval(), h, hard, 2, 4), h, hard


@pytest.mark.parametrize("attention_dropout", [0.5, 0.0])
def test_routed_training_applies_the_attention_dropout_of_core_blocks(attention_dropout):
    """Only the attention and residual dropouts can make a train-mode pass differ from an
    eval-mode one (with the attention weights' dropout off too, the residual dropout alone must);
    easy rows never change."""
    trained, evaluated, h, hard = dropout_passes(attention_dropout, residual_dropout=True)
    assert not torch.allclose(trained[hard], evaluated[hard])
    assert torch.equal(trained[~hard], h[~hard]) and torch.equal(evaluated[~hard], h[~hard])


@pytest.mark.parametrize("attention_dropout", [0.5, 0.0])
def test_routed_training_drops_attention_weights_exactly_when_core_blocks_do(attention_dropout):
    """With the residual dropout out of the way too, only dropout on the attention weights can
    make the hard rows of a train-mode pass differ from an eval-mode one."""
    trained, evaluated, _, hard = dropout_passes(attention_dropout, residual_dropout=False)
    assert torch.equal(trained[hard], evaluated[hard]) == (attention_dropout == 0.0)


def test_routed_generation_fills_max_seq_len_and_refuses_one_token_more():
    """The last new token is never fed in: a prompt of T tokens takes max_seq_len - T + 1 new ones."""
    from stagewise_lego_ashem.routed import generate_routed

    torch.manual_seed(0)
    config = TransformerConfig(vocab_size=40, n_layer=4, n_embd=16, n_head=2, ffn_hidden=32, max_seq_len=8)
    model = DeepSupervisionTransformer(config, exit_layer=2).eval()
    router = calibrated(model, torch.randint(0, 40, (8, 8), generator=torch.Generator().manual_seed(8)))
    prompt = torch.zeros(1, 3, dtype=torch.long)
    assert generate_routed(model, prompt, 6, router, router.threshold)["tokens"].shape == (1, 9)
    with pytest.raises(ValueError, match="prompt 3 \\+ 7 new tokens exceeds max_seq_len 8"):
        generate_routed(model, prompt, 7, router, router.threshold)


def test_the_sequence_cache_keeps_only_windows_with_a_hard_token():
    from stagewise_lego_ashem.mining import SequenceCache

    hard = torch.tensor([[False, True], [False, False], [True, True]])
    cache = SequenceCache({"hidden": torch.arange(3.0).view(3, 1, 1).expand(3, 2, 4), "target": torch.zeros(3, 2),
                           "hard": hard})
    assert len(cache) == 2 and cache.windows.tolist() == [0, 2]
    assert torch.equal(cache[1]["hard"], hard[2]) and float(cache[1]["hidden"][0, 0]) == 2.0


# --- passes over a whole split: per-batch results written into tensors allocated once -----------


def test_collect_rows_is_the_concatenation_and_checks_the_row_count():
    parts = [{"x": torch.randn(n, 3), "i": torch.arange(n)} for n in (4, 4, 1)]
    rows = collect_rows(iter(parts), 9)
    assert rows.keys() == {"x", "i"} and all(torch.equal(rows[k], torch.cat([p[k] for p in parts])) for k in rows)
    with pytest.raises(ValueError, match="the batches hold 9 rows, expected 10"):
        collect_rows(parts, 10)
    with pytest.raises(ValueError, match="the batches hold more than the 8 rows expected"):
        collect_rows(parts, 8)


def _mined_hard_ppl(model, batches, router, windows):
    """``mined_hard_ppl`` with every token of ``batches`` (windows of 7) cached as hard: a token batch each."""
    tokens = [None] * (windows * 7)  # all it reads of the cache: its length
    token_batches = ({"hidden": model.exit_hidden(b["input"]).flatten(0, 1).unsqueeze(1),
                      "target": b["target"].flatten()} for b in batches)
    return mined_hard_ppl(SimpleNamespace(model=model, batches=lambda *_, **__: token_batches), tokens)


SPLIT_PASSES = {  # each pass over a whole split that keeps per-batch results: (model, batches, router, windows)
    "exit_scores": lambda model, batches, router, n: {"scores": exit_scores(model, batches, router, windows=n)},
    "exit_states": lambda model, batches, router, n: exit_states(model, batches, router, windows=n),
    "probe_data": lambda model, batches, router, n: probe_data(model, batches, windows=n),
}


@pytest.mark.parametrize("name", SPLIT_PASSES)
def test_a_pass_over_a_split_equals_its_batches_results_concatenated(name):
    model = small_model()
    idx = torch.randint(0, 40, (20, 7), generator=torch.Generator().manual_seed(21))
    batches = [{"input": idx[s:s + 3], "target": idx[s:s + 3].roll(-1, 1)} for s in range(0, 20, 3)]  # last: 2
    router, split_pass = calibrated(model, idx), SPLIT_PASSES[name]
    whole = split_pass(model, batches, router, 20)
    alone = [split_pass(model, [b], router, len(b["input"])) for b in batches]  # as each batch's pieces were
    assert all(torch.equal(whole[k], torch.cat([a[k] for a in alone])) for k in whole)


@pytest.mark.parametrize("name", [*SPLIT_PASSES, "mined_hard_ppl"])
def test_a_pass_over_a_split_holds_no_tensor_per_batch(name):
    """Each batch is copied into outputs allocated once. Holding every batch's pieces until a final
    torch.cat pinned glibc's heap between the batches' full-vocabulary logits (GB of RSS for 14 MB)."""
    model = small_model()
    idx = torch.randint(0, 40, (24, 7), generator=torch.Generator().manual_seed(23))
    batches = [{"input": idx[s:s + 4], "target": idx[s:s + 4].roll(-1, 1)} for s in range(0, 24, 4)]
    alive = []

    def counted():  # the batches, counting the tensors alive as each one is drawn
        for batch in batches:
            gc.collect()
            alive.append(sum(type(o) is torch.Tensor for o in gc.get_objects()))
            yield batch

    split_pass, router = SPLIT_PASSES.get(name, _mined_hard_ppl), calibrated(model, idx)
    gc.collect()
    gc.freeze()  # what exists before the pass stays as it is: each count walks only what came after (fast)
    try:
        split_pass(model, counted(), router, 24)
    finally:
        gc.unfreeze()
    assert len(alive) == 6 and alive[2:] == [alive[2]] * 4, alive


# --- counted FLOPs, the curve, the probe, phase-2 speedups: numbers users read ------------------


def _shape(n_layer: int = 4, exit_layer: int = 2):
    from stagewise_lego_ashem.metrics import Shape

    return Shape(n_embd=16, ffn_hidden=32, vocab_size=40, n_layer=n_layer, exit_layer=exit_layer)


@pytest.mark.parametrize(("measure", "per_vocab"), [("max_prob", 3), ("margin", 4), ("neg_entropy", 5)])
def test_routed_flops_with_every_token_hard_are_full_depth_plus_the_exit_head_and_confidence(measure, per_vocab):
    """All hard: every layer runs for every row, as in the full-depth forward; a softmax measure
    adds the exit head (2·C·V) and its confidence (per_vocab·V) for every token."""
    from stagewise_lego_ashem.metrics import full_depth_flops, routed_flops

    shape, hard = _shape(), torch.zeros(3, 5, dtype=torch.bool)  # easy mask: nobody exits
    n, C, V = 15, 16, 40
    extra = routed_flops(shape, hard, measure) - full_depth_flops(shape, torch.ones(3, 5, dtype=torch.bool))
    assert extra == pytest.approx(n * (2 * C * V + per_vocab * V), rel=1e-12)


def test_routed_flops_with_the_probe_pay_one_head_per_token():
    """The probe (C -> 1: 2·C per token) replaces the exit softmax: no exit head for hard tokens,
    so all hard costs full depth + the probe; all easy costs the lower layers and one head per
    token (no upper block runs: no query there would read keys/values)."""
    from stagewise_lego_ashem.metrics import full_depth_flops, routed_flops

    shape, every = _shape(), torch.ones(3, 5, dtype=torch.bool)
    n, C, V = 15, 16, 40
    assert routed_flops(shape, ~every, "probe") - full_depth_flops(shape, every) == pytest.approx(n * 2 * C, rel=1e-12)
    lower = full_depth_flops(_shape(n_layer=2), every) - n * 2 * C * V  # two blocks, no head
    expected_easy = lower + n * 2 * C + n * 2 * C * V
    assert routed_flops(shape, every, "probe") == pytest.approx(expected_easy, rel=1e-12)


def test_phase2_step_and_token_step_flops_follow_the_layers_they_run():
    """All hard: a cached step's forward is the upper blocks plus the head (x3 with the backward),
    and the lower blocks' forward is what a full-forward step adds: lower + cache/3 = full depth.
    A token-mode step is the upper blocks on length-1 sequences (x3)."""
    from stagewise_lego_ashem.metrics import full_depth_flops, phase2_step_flops, token_step_flops

    shape, hard = _shape(), torch.ones(2, 6, dtype=torch.bool)
    counted = phase2_step_flops(shape, hard)
    assert counted["lower"] + counted["cache"] / 3 == pytest.approx(full_depth_flops(shape, hard), rel=1e-12)
    assert counted["lower"] == pytest.approx(full_depth_flops(_shape(n_layer=2), hard) - 12 * 2 * 16 * 40, rel=1e-12)
    two_blocks_alone = full_depth_flops(_shape(n_layer=2), torch.ones(7, 1, dtype=torch.bool))  # 7 tokens, T = 1
    assert token_step_flops(shape, 7) == pytest.approx(3 * two_blocks_alone, rel=1e-12)


def _matmul_flops(fn) -> int:
    """torch's own count of fn()'s linear layers (mm, and addmm for the probe's bias; 2 FLOPs per
    multiply-add), forward and backward."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    counts = counter.get_flop_counts()["Global"]
    return counts[torch.ops.aten.mm] + counts.get(torch.ops.aten.addmm, 0)


def _routed_matmul_flops(model, idx: torch.Tensor, easy: torch.Tensor, measure: str) -> int:
    """``_matmul_flops`` of the routed forward of idx (B, T) with exactly the tokens ``easy`` (B, T) exiting."""
    router = Confidence(ConfidenceOptions(measure=measure))
    router.route = lambda scores, threshold: stagewise.Routing(masks={"easy": easy, "hard": ~easy}, scores=scores)
    with torch.no_grad():
        return _matmul_flops(functools.partial(routed_forward, model, idx, router, 0.5))


def test_counted_flops_less_attention_and_softmax_are_torch_flop_counters_matmuls():
    """The counts against ``FlopCounterMode`` for everything but what it counts differently: attention
    (counted over each row's causal context, 4·C FLOPs per position; torch counts its dense masked
    kernel, or nothing for CPU's fused one) and the exit softmax (elementwise, which torch leaves out).
    Every sequence has 2 hard tokens, so the routed blocks' queries need no padded slots."""
    from stagewise_lego_ashem.metrics import context_sum, full_depth_flops, phase2_step_flops, routed_flops

    model, shape = small_model(exit_probe=True), _shape()
    idx = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(16))
    hard = torch.tensor([[False, True, False, False, True], [True, False, True, False, False]])
    every, C, n = torch.ones_like(hard), 16, 10
    attention = 2 * 4 * C * context_sum(every), 2 * 4 * C * context_sum(hard)  # two lower, two upper blocks
    for measure, softmax in (("max_prob", 3 * n * 40), ("probe", 0)):
        routed = _routed_matmul_flops(model, idx, ~hard, measure)
        assert routed == routed_flops(shape, ~hard, measure) - sum(attention) - softmax, measure
    counted = phase2_step_flops(shape, hard)
    with torch.no_grad():
        assert _matmul_flops(lambda: model(idx)) == full_depth_flops(shape, every) - 2 * attention[0]
        assert _matmul_flops(functools.partial(model.exit_hidden, idx)) == counted["lower"] - attention[0]
        hidden = model.exit_hidden(idx)
    cached = _matmul_flops(lambda: torch.nn.functional.cross_entropy(
        upper_forward(model, "full")({"hidden": hidden, "hard": hard})["logits"], idx[hard]).backward())
    assert cached == counted["cache"] - 3 * attention[1]  # the backward: twice the forward's products


@pytest.mark.parametrize("measure", ["max_prob", "probe"])
def test_a_batch_with_no_hard_token_counts_no_upper_keys_values(measure):
    """No query runs above the exit, so ``routed_layers`` returns at once; the count once paid the
    upper blocks' keys and values for every position anyway (3% of an all-easy benchmark batch)."""
    from stagewise_lego_ashem.metrics import context_sum, routed_flops

    idx = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(16))
    easy = torch.ones(2, 5, dtype=torch.bool)
    routed = _routed_matmul_flops(small_model(exit_probe=True), idx, easy, measure)
    softmax, attention = (3 * 10 * 40 if measure == "max_prob" else 0), 2 * 4 * 16 * context_sum(easy)
    assert routed == routed_flops(_shape(), easy, measure) - attention - softmax


def test_seed_compute_cost_is_the_layer_count():
    from stagewise_lego_ashem.metrics import seed_compute_cost

    # 3 of 4 tokens exit at layer 1 of 4: (3·1 + 1·4) / (4·4)
    assert seed_compute_cost(3, 4, 1, 4) == pytest.approx(7 / 16)


def test_the_router_keeps_every_twentieth_calibration_quantile_for_the_curve():
    """21 quantiles, 0 to 1 in steps of 1/20: on 0..10 they are 0, 0.5, ..., 10 (the curve indexes them)."""
    from stagewise_lego_ashem.mining import CURVE_QUANTILES, score_quantiles

    assert CURVE_QUANTILES == 21
    assert score_quantiles(torch.arange(11.0).view(1, 11)) == pytest.approx([k / 2 for k in range(21)], abs=1e-12)


class _State:
    """The parts of stagewise.State that the routed evaluation and the curve read."""

    def __init__(self, model, batches, artifacts=None):
        from stagewise.engine.distributed import DistInfo

        self.model, self._batches, self.artifacts, self.routers = model, batches, artifacts or {}, {}
        self.data = {split: [None] * sum(len(b["input"]) for b in bs) for split, bs in batches.items()}  # windows
        self.dist, self.run_dir, self.logged, self.seed, self.stage_index = DistInfo(), None, [], 0, 0
        self.device, self.resumed_from, self.stage_name = torch.device("cpu"), None, "test"
        self.recipe = SimpleNamespace(run=SimpleNamespace(name="lego"), stages=[SimpleNamespace(checkpoint="test")])

    keep_router = stagewise.State.keep_router

    def batches(self, split, shard=True, **_):
        return self._batches[split]

    def log(self, event, **fields):
        self.logged.append((event, fields))

    def print(self, text):
        pass


def _curve_state():
    """A state for the curve: a small model's calibrated router and its score quantiles on one batch."""
    from stagewise_lego_ashem.mining import ROUTER, score_quantiles

    model = small_model()
    idx = torch.randint(0, 40, (4, 12), generator=torch.Generator().manual_seed(11))
    router = calibrated(model, idx)
    with torch.no_grad():
        quantiles = score_quantiles(router.score(model, model.exit_hidden(idx))[0])
    state = _State(model, {"test": [{"input": idx, "target": idx.roll(-1, 1)}]}, {ROUTER: {"quantiles": quantiles}})
    return state, router, quantiles


def test_the_curve_takes_evenly_spread_calibration_quantiles_and_ends_with_nobody_exiting():
    from stagewise_lego_ashem.evaluation import accuracy_compute_curve

    state, router, quantiles = _curve_state()
    rows = accuracy_compute_curve(state, "test", router, 3)  # quantiles 0, 10, 20 of 21
    assert [r["threshold"] for r in rows] == [quantiles[0], quantiles[10], math.inf]
    # evaluated on the calibration tokens themselves: the minimum lets every token exit, the
    # median half of them, and the top point (infinity) none: full depth, compute_cost 1
    assert [r["shallow_ratio"] for r in rows] == [1.0, pytest.approx(0.5, abs=1 / 48), 0.0]
    assert rows[0]["compute_cost"] == pytest.approx(0.5) and rows[-1]["compute_cost"] == 1.0
    assert state.logged[0][0] == "lego_ashem.curve" and state.logged[0][1]["points"] == rows



def test_the_curve_table_is_titled_with_its_stage_split_and_measure():
    # was: the bare table, with nothing to say which stage, split or router it was (the probe recipe prints two)
    from stagewise_lego_ashem.evaluation import accuracy_compute_curve

    state, router, _ = _curve_state()
    printed = []
    state.print = printed.append
    accuracy_compute_curve(state, "test", router, 3)
    assert printed[0].splitlines()[:2] == ["test: accuracy vs compute on test, routed by max_prob",
                                           f"{'threshold':>10}{'shallow':>9}{'acc':>8}{'ppl':>10}{'cost':>7}{'flops':>7}"]

def test_the_curve_plot_says_that_compute_above_1_costs_more_than_full_depth(tmp_path, monkeypatch):
    # was: the x axis said "(1 = full depth)" while the exit head and confidence push
    # compute_cost_flops above 1 at high thresholds, which read like a scale error
    import stagewise.plots
    from stagewise.engine.rundir import RunDir
    from stagewise_lego_ashem.evaluation import accuracy_compute_curve

    drawn = []
    monkeypatch.setattr(stagewise.plots, "line_plot", lambda path, series, **kw: drawn.append(kw))
    state, router, _ = _curve_state()
    state.run_dir = RunDir(tmp_path)
    rows = accuracy_compute_curve(state, "test", router, 2)
    assert rows[-1]["compute_cost_flops"] > 1  # full depth plus the exit head: the case the label explains
    assert "(>1: routing costs more)" in drawn[0]["xlabel"] and "1 = full depth" not in drawn[0]["xlabel"]
    assert drawn[0]["vlines"] == [(1.0, "full depth")]


def test_each_routed_evaluation_draws_its_own_curve_named_by_stage_and_measure(tmp_path, monkeypatch):
    # was: every stage drew plots/accuracy_compute.png, so the documented probe recipe's test_probe
    # overwrote test's max-softmax curve, and the plot said neither the stage nor the measure
    import stagewise.plots
    from stagewise.engine.rundir import RunDir
    from stagewise_lego_ashem.evaluation import accuracy_compute_curve

    drawn = []
    monkeypatch.setattr(stagewise.plots, "line_plot", lambda path, series, **kw: drawn.append((path, series, kw)))
    state, router, _ = _curve_state()
    state.run_dir = RunDir(tmp_path)
    for stage in ("test", "test_probe"):
        state.stage_name = state.recipe.stages[0].checkpoint = stage  # a checkpoint is named as its stage by default
        accuracy_compute_curve(state, "test", router, 2)
    assert [path.name for path, _, _ in drawn] == ["accuracy_compute_test.png", "accuracy_compute_test_probe.png"]
    assert drawn[1][2]["title"] == "lego: accuracy vs compute on test (stage test_probe)"  # was without the run
    # a stage name no file may carry on Windows (was: accuracy_compute_test: probe.png, an NTFS data stream there)
    state.stage_name, state.recipe.stages[0].checkpoint = "test: probe", "test_probe2"
    accuracy_compute_curve(state, "test", router, 2)
    assert drawn[2][0].name == "accuracy_compute_test_probe2.png"
    assert drawn[2][2]["title"] == "lego: accuracy vs compute on test (stage test: probe)"
    assert list(drawn[0][1]) == [f"routed by {router.options.measure}, threshold sweep"]


def test_probe_labels_say_whether_the_exit_argmax_is_the_final_argmax():
    from stagewise_lego_ashem.probe import probe_data

    model = small_model()
    idx = torch.randint(0, 40, (3, 9), generator=torch.Generator().manual_seed(12))
    data = probe_data(model, [{"input": idx}], windows=3)
    with torch.no_grad():
        out = model(idx, exit_layers=[2])
    expected = (out["exit_logits"][2].argmax(-1) == out["logits"].argmax(-1)).flatten()
    assert 0 < int(expected.sum()) < expected.numel()  # both labels occur: the test can tell them apart
    assert torch.equal(data["label"], expected)
    assert torch.equal(data["hidden"], model.exit_hidden(idx).flatten(0, 1))


def test_train_exit_probe_calibrates_on_calib_split_and_scores_its_accuracy_there():
    from stagewise_lego_ashem.mining import ROUTER
    from stagewise_lego_ashem.probe import probe_data
    from stagewise_lego_ashem.router import quantile_threshold
    from stagewise_lego_ashem.stages import TrainExitProbe, TrainExitProbeOptions

    torch.manual_seed(0)
    config = TransformerConfig(vocab_size=40, n_layer=4, n_embd=16, n_head=2, ffn_hidden=32)
    model = DeepSupervisionTransformer(config, exit_layer=2, exit_probe=True).eval()
    g = torch.Generator().manual_seed(13)
    train, valid = (torch.randint(0, 40, (4, 10), generator=g) for _ in range(2))
    state = _State(model, {"train": [{"input": train}], "valid": [{"input": valid}]},
                   {ROUTER: {"measure": "max_prob", "hard_ratio": 0.3, "threshold": 0.1}})
    metrics = TrainExitProbe(TrainExitProbeOptions(epochs=2), label="probe").run(state)
    calib = probe_data(model, [{"input": valid}], windows=4)
    with torch.no_grad():
        scores = torch.sigmoid(model.exit_probe(calib["hidden"]).squeeze(-1))
    assert metrics["probe/threshold"] == pytest.approx(quantile_threshold(scores, 0.3), abs=1e-6)
    assert model.threshold == pytest.approx(metrics["probe/threshold"], abs=1e-6)
    labels = calib["label"]
    assert metrics["probe/probe_acc"] == pytest.approx(float(((scores >= 0.5) == labels).float().mean()))
    agreement = float(probe_data(model, [{"input": train}], windows=4)["label"].float().mean())
    assert metrics["probe/agreement"] == pytest.approx(agreement)
    assert state.artifacts[ROUTER]["measure"] == "probe"
    assert state.routers == {ROUTER: {"use": "lego_ashem.confidence",  # what export writes: the probe router now
                                      "options": {"measure": "probe", "hard_ratio": 0.3},
                                      "state": {"threshold": metrics["probe/threshold"]}}}


def test_probe_acc_counts_a_score_of_exactly_one_half_as_predicting_agreement():
    """Like the router, which exits at confidence >= threshold: a tie at 0.5 predicts label 1."""
    from stagewise_lego_ashem.mining import ROUTER
    from stagewise_lego_ashem.probe import probe_data, probe_scores
    from stagewise_lego_ashem.stages import TrainExitProbe, TrainExitProbeOptions

    torch.manual_seed(0)
    config = TransformerConfig(vocab_size=40, n_layer=4, n_embd=16, n_head=2, ffn_hidden=32)
    model = DeepSupervisionTransformer(config, exit_layer=2, exit_probe=True).eval()
    torch.nn.init.zeros_(model.exit_probe.weight)
    torch.nn.init.zeros_(model.exit_probe.bias)
    g = torch.Generator().manual_seed(13)
    train, valid = (torch.randint(0, 40, (4, 10), generator=g) for _ in range(2))
    state = _State(model, {"train": [{"input": train}], "valid": [{"input": valid}]},
                   {ROUTER: {"measure": "max_prob", "hard_ratio": 0.3, "threshold": 0.1}})
    # an lr of 1e-30 keeps every logit far below float32's resolution around sigmoid(0) = 0.5
    metrics = TrainExitProbe(TrainExitProbeOptions(epochs=1, lr=1e-30), label="probe").run(state)
    calib = probe_data(model, [{"input": valid}], windows=4)
    assert torch.equal(probe_scores(model.exit_probe, calib["hidden"]), torch.full((40,), 0.5))
    labels = calib["label"]
    assert 0 < int(labels.sum()) < labels.numel()  # both labels occur: a tie read as 0 would score differently
    assert metrics["probe/probe_acc"] == float(labels.float().mean())


def test_train_exit_probe_reports_the_final_training_loss_of_an_unchanged_fit():
    """``probe/probe_loss`` is what fit_probe returns (the last epoch's mean loss on ``split``): the
    same fit, on the same data with the same seed, gives the same probe and the same loss."""
    import copy

    from stagewise_lego_ashem.mining import ROUTER
    from stagewise_lego_ashem.probe import fit_probe, probe_data
    from stagewise_lego_ashem.stages import TrainExitProbe, TrainExitProbeOptions

    torch.manual_seed(0)
    config = TransformerConfig(vocab_size=40, n_layer=4, n_embd=16, n_head=2, ffn_hidden=32)
    model = DeepSupervisionTransformer(config, exit_layer=2, exit_probe=True).eval()
    alone = copy.deepcopy(model)
    g = torch.Generator().manual_seed(18)
    train, valid = (torch.randint(0, 40, (4, 10), generator=g) for _ in range(2))
    state = _State(model, {"train": [{"input": train}], "valid": [{"input": valid}]},
                   {ROUTER: {"measure": "max_prob", "hard_ratio": 0.3, "threshold": 0.1}})
    metrics = TrainExitProbe(TrainExitProbeOptions(epochs=2, batch_size=16), label="probe").run(state)
    loss = fit_probe(alone.exit_probe, probe_data(alone, [{"input": train}], windows=4), epochs=2, lr=1e-2,
                     batch_size=16, seed=0)  # state.seed + state.stage_index
    assert metrics["probe/probe_loss"] == loss and 0 < loss < 1
    assert all(torch.equal(a, b) for a, b in zip(model.exit_probe.parameters(), alone.exit_probe.parameters(),
                                                 strict=True))


def _phase2_speedups(hard: torch.Tensor) -> dict[str, float]:
    """phase2_speedups on a cache of 2 windows of 3 tokens whose hard rows are ``hard``, batch size 2."""
    from stagewise_lego_ashem.evaluation import phase2_speedups

    model = small_model()
    idx = torch.randint(0, 40, (2, 3), generator=torch.Generator().manual_seed(14))
    with torch.no_grad():
        hidden = model.exit_hidden(idx)
    cache = {"split": "train", "exit_layer": 2, "hidden": hidden, "target": idx.roll(-1, 1), "hard": hard}
    state = SimpleNamespace(model=model, device=torch.device("cpu"),
                            recipe=SimpleNamespace(data=SimpleNamespace(batch_size=2)))
    return phase2_speedups(state, cache, [{"input": row} for row in idx], repeats=1)


def test_phase2_counted_speedups_compare_the_layers_each_step_runs():
    """Every cached token hard, 2 windows of 3 tokens, batch 2: one cached step. A full-forward
    step adds the frozen lower blocks' forward (A) to the cached step (3U: the upper blocks and
    the head, forward and backward); token mode runs the 6 hard tokens alone in 3 steps of 2."""
    from stagewise_lego_ashem.metrics import full_depth_flops

    out = _phase2_speedups(torch.ones(2, 3, dtype=torch.bool))
    every, head = torch.ones(2, 3, dtype=torch.bool), 2 * 16 * 40
    lower = full_depth_flops(_shape(n_layer=2), every) - 6 * head  # blocks 1-2, no head
    upper = full_depth_flops(_shape(), every) - lower  # blocks 3-4 and the head
    assert out["phase2_cache_speedup_flops"] == pytest.approx((lower + 3 * upper) / (3 * upper), rel=1e-12)
    token_step = 3 * full_depth_flops(_shape(n_layer=2), torch.ones(2, 1, dtype=torch.bool))  # 2 tokens, T = 1
    assert out["phase2_token_mode_speedup_flops"] == pytest.approx((lower + 3 * upper) / (3 * token_step), rel=1e-12)
    assert all(out[k] > 0 for k in ("phase2_cache_step_ms", "phase2_full_forward_step_ms", "phase2_token_step_ms"))


def test_phase2_epoch_times_are_each_step_time_times_the_steps_of_its_epoch():
    """The benchmark's "phase 2 epoch from the cache vs a full-forward epoch": 2 windows in one
    batch of 2 take one step either way; 5 hard tokens in batches of 2 take 3 token-mode steps."""
    out = _phase2_speedups(torch.tensor([[True, True, True], [True, False, True]]))
    assert out["phase2_cache_epoch_s"] == out["phase2_cache_step_ms"] / 1e3
    assert out["phase2_full_forward_epoch_s"] == out["phase2_full_forward_step_ms"] / 1e3
    assert out["phase2_token_epoch_s"] == pytest.approx(3 * out["phase2_token_step_ms"] / 1e3, rel=1e-12)
    assert out["phase2_token_mode_speedup"] == out["phase2_full_forward_epoch_s"] / out["phase2_token_epoch_s"]


def test_a_token_mode_epoch_counts_its_short_last_step():
    """5 hard tokens in batches of 2 take 3 token-mode steps, the last one short (not 2)."""
    from stagewise_lego_ashem.metrics import phase2_step_flops, token_step_flops

    hard = torch.tensor([[True, True, True], [True, False, True]])
    out = _phase2_speedups(hard)
    counted = phase2_step_flops(_shape(), hard)  # one sequence step: both windows
    expected = (counted["lower"] + counted["cache"]) / (3 * token_step_flops(_shape(), 2))
    assert out["phase2_token_mode_speedup_flops"] == pytest.approx(expected, rel=1e-12)


def test_confidence_flops_share_is_the_confidence_over_the_routed_forward():
    from stagewise_lego_ashem.evaluation import _confidence_flops_share
    from stagewise_lego_ashem.metrics import routed_flops

    model = small_model()
    idx = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(15))
    router = calibrated(model, idx)
    easy = routed_forward(model, idx, router, router.threshold)["easy"]
    assert 0 < int(easy.sum()) < easy.numel()
    expected = 12 * 3 * 40 / routed_flops(_shape(), easy, "max_prob")  # 3 FLOPs per vocabulary entry, every token
    assert _confidence_flops_share(model, idx, router) == pytest.approx(expected, rel=1e-12)


def test_the_model_refuses_an_exit_layer_outside_it():
    config = TransformerConfig(vocab_size=40, n_layer=2, n_embd=16, n_head=2, ffn_hidden=32)
    for exit_layer in (0, 3):
        with pytest.raises(ValueError, match="outside the model"):
            DeepSupervisionTransformer(config, exit_layer=exit_layer)


@pytest.mark.parametrize("measure", ["max_prob", "margin", "neg_entropy"])
def test_chunked_exit_confidence_equals_the_unchunked_one_across_chunk_boundaries(measure):
    from stagewise_lego_ashem.router import SCORE_ROWS, confidence_and_exit_logits

    model = small_model()
    h = torch.randn(3, 100, 16, generator=torch.Generator().manual_seed(16))  # 300 rows: 3 chunks of 128
    assert 2 * SCORE_ROWS < 300
    with torch.no_grad():
        confidence, logits = confidence_and_exit_logits(model, h, measure)
        expected_logits = model.logits_from_hidden(h)
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(confidence, confidence_from_logits(expected_logits, measure), rtol=0, atol=1e-6)


def test_exit_confidence_with_gradients_enabled_equals_the_no_grad_one():
    """Scoring outside no_grad (e.g. in a plugin's training step) cannot write the head's output
    into a preallocated buffer (autograd refuses ``out=``): the same numbers come another way."""
    from stagewise_lego_ashem.router import confidence_and_exit_logits

    model = small_model()
    h = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(16))
    confidence, logits = confidence_and_exit_logits(model, h, "max_prob")
    with torch.no_grad():
        expected = confidence_and_exit_logits(model, h, "max_prob")
    torch.testing.assert_close((confidence, logits), expected, rtol=0, atol=1e-6)


def test_calibrating_on_non_finite_confidences_names_the_divergence():
    """A diverged model scores NaN: a NaN threshold would route no token and fail later with
    "call calibrate() before route()"; calibration says what happened instead."""
    from stagewise.errors import TrainingError
    from stagewise_lego_ashem.router import Confidence

    scores = torch.tensor([0.2, float("nan"), 0.7, float("nan")])
    with pytest.raises(TrainingError, match="2 of 4 calibration confidences are not finite, so the model has diverged"):
        Confidence().calibrate(scores)


def test_timings_wait_for_the_gpu_before_reading_the_clock(monkeypatch):
    # CUDA runs queued work after the call returns: without a wait, routed/full times were launch times
    from stagewise_lego_ashem import timing

    events = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: events.append("wait"))
    timing.interleaved_seconds({"a": lambda: events.append("a"), "b": lambda: events.append("b")}, repeats=1)
    assert events == ["wait", "a", "wait", "wait", "b", "wait"] * 2


def test_routing_before_calibration_says_what_to_call():
    with pytest.raises(RuntimeError, match=r"^lego_ashem\.confidence: call calibrate\(\) \(or pass a threshold\) "
                                           r"before route\(\)$"):
        Confidence().route(torch.zeros(3))


def test_a_measure_that_does_not_score_logits_lists_those_that_do():
    with pytest.raises(ValueError, match="^measure 'probe' does not score logits; use one of max_prob, margin, "
                                         "neg_entropy$"):
        confidence_from_logits(torch.zeros(2, 3), "probe")
