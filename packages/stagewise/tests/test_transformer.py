"""The shared transformer: shapes, causality, exits, hidden states, errors, determinism."""

from types import SimpleNamespace

import pytest
import torch

from stagewise.data.splits import DataSplits
from stagewise.nn.transformer import (
    RMSNorm,
    TransformerConfig,
    TransformerLM,
    TransformerOptions,
    apply_rope,
    rope_tables,
)

CONFIG = dict(vocab_size=13, n_layer=3, n_head=2, n_embd=16, ffn_hidden=32, max_seq_len=12)


def make_model(seed: int = 0) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(TransformerConfig(**CONFIG)).eval()


def tokens(B: int = 2, T: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, CONFIG["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


def test_output_shapes_and_parameter_names():
    model = make_model()
    out = model(tokens(), exit_layers=(1, 2), return_hidden=True)
    assert out["logits"].shape == (2, 8, 13)
    assert {k: v.shape for k, v in out["exit_logits"].items()} == {1: (2, 8, 13), 2: (2, 8, 13)}
    assert [h.shape for h in out["hidden"]] == [(2, 8, 16)] * 4
    names = set(dict(model.named_parameters()))
    assert {"embedding.weight", "norm.weight", "head.weight"} <= names
    assert all(n.startswith(("embedding.", "layers.", "norm.", "head.")) for n in names)
    assert not any(n.startswith("rope") for n in model.state_dict())  # buffers are not persistent


def test_plain_forward_returns_only_logits():
    assert list(make_model()(tokens())) == ["logits"]


def test_causal_at_every_exit():
    model = make_model()
    idx = tokens(B=1, T=8)
    layers = (1, 2, 3)
    before = model(idx, exit_layers=layers)
    for t in range(7):
        changed = idx.clone()
        changed[0, t + 1] = (changed[0, t + 1] + 1) % CONFIG["vocab_size"]
        after = model(changed, exit_layers=layers)
        for layer in layers:
            assert torch.equal(before["exit_logits"][layer][:, : t + 1], after["exit_logits"][layer][:, : t + 1])
            assert not torch.equal(before["exit_logits"][layer][:, t + 1], after["exit_logits"][layer][:, t + 1])


def test_last_exit_is_the_logits():
    out = make_model()(tokens(), exit_layers=[3])
    assert torch.equal(out["exit_logits"][3], out["logits"])


def test_rerun_from_every_hidden_state():
    model = make_model()
    out = model(tokens(), return_hidden=True)
    assert len(out["hidden"]) == CONFIG["n_layer"] + 1
    for k, h in enumerate(out["hidden"]):
        assert torch.equal(model.logits_from_hidden(model.run_layers(h, k, 3)), out["logits"])


def test_forward_batch_passes_needs():
    model = make_model()
    out = model.forward_batch({"input": tokens()}, SimpleNamespace(exit_layers=frozenset({2}), hidden=True))
    assert set(out) == {"logits", "exit_logits", "hidden"} and list(out["exit_logits"]) == [2]


@pytest.mark.parametrize("layer", [0, 4])
def test_bad_exit_layer(layer):
    with pytest.raises(ValueError, match=rf"exit layer {layer} .* 1\.\.3"):
        make_model()(tokens(), exit_layers=(layer,))


def test_too_long_sequence():
    with pytest.raises(ValueError, match=r"sequence length 13 .* max_seq_len 12"):
        make_model()(tokens(T=13))


@pytest.mark.parametrize("change, message", [
    (dict(n_embd=15), "divisible by n_head"),
    (dict(n_embd=18, n_head=6), "must be even"),
    (dict(n_layer=0), "n_layer: must be a positive integer"),
    (dict(vocab_size=0), "vocab_size: must be a positive integer"),
])
def test_config_errors(change, message):
    with pytest.raises(ValueError, match=message):
        TransformerConfig(**{**CONFIG, **change})


def test_same_seed_same_init():
    a, b, c = make_model(0).state_dict(), make_model(0).state_dict(), make_model(1).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["head.weight"], c["head.weight"])


def test_residual_projections_get_scaled_init():
    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(**{**CONFIG, "n_embd": 64, "ffn_hidden": 256}))
    assert model.layers[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.layers[0].ffn.down.weight.std().item() == pytest.approx(0.02 / 6**0.5, rel=0.05)


def test_fixed_weights_give_known_logits():
    model = make_model()
    with torch.no_grad():
        for i, param in enumerate(model.parameters()):
            ramp = torch.linspace(-0.5, 1.0, param.numel()).view_as(param)
            param.copy_(ramp * (0.1 + 0.01 * i))
    idx = torch.arange(10).view(2, 5)
    logits = model(idx)["logits"]
    # computed once with this implementation; a change here means the maths changed
    assert logits.abs().mean().item() == pytest.approx(0.3789523, abs=1e-6)
    assert logits.max().item() == pytest.approx(0.8624149, abs=1e-6)
    assert logits[0, 0, :2].tolist() == pytest.approx([0.3680080, 0.2655334], abs=1e-6)
    assert logits[1, -1, :2].tolist() == pytest.approx([-0.3679183, -0.2654590], abs=1e-6)


def test_from_recipe_takes_vocab_size_from_data():
    model = TransformerLM.from_recipe(TransformerOptions(n_layer=1, n_embd=8, n_head=2, ffn_hidden=16),
                                      DataSplits({}, {"vocab_size": 7}))
    assert model.head.weight.shape == (7, 8) and TransformerLM.Options is TransformerOptions
    with pytest.raises(ValueError, match="vocab_size"):
        TransformerLM.from_recipe(TransformerOptions(), DataSplits({}, {"input_shape": [3]}))


def test_generate_is_seeded():
    model = make_model()
    a = model.generate(tokens(T=4), 10, top_k=5, generator=torch.Generator().manual_seed(3))
    b = model.generate(tokens(T=4), 10, top_k=5, generator=torch.Generator().manual_seed(3))
    assert a.shape == (2, 14) and torch.equal(a, b) and torch.equal(a[:, :4], tokens(T=4))


# --- what a mutation audit found unpinned ----------------------------------------------------


def test_each_exit_is_the_head_on_that_layers_hidden_state():
    model = make_model()
    idx = tokens()
    out = model(idx, exit_layers=(1, 2, 3), return_hidden=True)
    h = model.embed(idx)
    for layer in (1, 2, 3):
        h = model.run_layers(h, layer - 1, layer)  # the first `layer` blocks, run by hand
        assert torch.equal(out["hidden"][layer], h)
        assert torch.equal(out["exit_logits"][layer], model.logits_from_hidden(h))


@pytest.mark.parametrize("start, end", [(2, 1), (-1, 1), (0, 4)])
def test_run_layers_range_errors(start, end):
    model = make_model()
    with pytest.raises(ValueError, match=rf"run_layers\(start={start}, end={end}\) needs 0 <= start <= end <= "
                                         rf"n_layer = 3"):
        model.run_layers(model.embed(tokens()), start, end)


def test_a_sequence_of_max_seq_len_is_accepted():
    assert make_model()(tokens(T=12))["logits"].shape == (2, 12, 13)


def test_rope_tables_follow_the_rotary_definition():
    # angle of pair i at position p: p * base ** (-2i / head_dim); head_dim 4, base 100: p * [1, 0.1]
    cos, sin = rope_tables(4, 3, 100.0)
    angles = torch.tensor([[0.0, 0.0], [1.0, 0.1], [2.0, 0.2]])
    assert torch.allclose(cos, angles.cos()) and torch.allclose(sin, angles.sin())


def test_rope_rotates_pairs_half_a_head_apart():
    # x (1, 1, 1, 4): pairs (x0, x2) and (x1, x3), turned by 90 and 180 degrees
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 4)
    cos, sin = torch.tensor([[0.0, -1.0]]), torch.tensor([[1.0, 0.0]])
    assert apply_rope(x, cos, sin).flatten().tolist() == [-3.0, -2.0, 1.0, -4.0]


def test_rope_makes_the_order_of_earlier_tokens_matter():
    # Causal attention without positions is a symmetric sum over earlier tokens: with one block,
    # the output at position 2 could not tell [a, b, c] from [b, a, c]. Rotating queries and keys can.
    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(**{**CONFIG, "n_layer": 1})).eval()
    with torch.no_grad():
        model.layers[0].attn.qkv.weight.mul_(20)  # sharp attention, so positions change the output clearly
    a = model(torch.tensor([[1, 2, 3, 4]]))["logits"][0, 2:]
    b = model(torch.tensor([[2, 1, 3, 4]]))["logits"][0, 2:]
    assert (a - b).abs().max() > 1e-3


def test_dropout_is_off_in_eval_mode():
    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(**{**CONFIG, "dropout": 0.5})).eval()
    plain = make_model()
    plain.load_state_dict(model.state_dict())
    idx = tokens()
    assert torch.equal(model(idx)["logits"], plain(idx)["logits"])


def greedy(model: TransformerLM, idx: torch.Tensor, n: int) -> torch.Tensor:
    """The most likely next token n times, each from the last max_seq_len tokens."""
    for _ in range(n):
        logits = model(idx[:, -CONFIG["max_seq_len"]:])["logits"][:, -1]
        idx = torch.cat([idx, logits.argmax(-1, keepdim=True)], dim=1)
    return idx


def test_top_k_1_and_a_tiny_temperature_are_greedy_past_max_seq_len():
    model = make_model()
    expected = greedy(model, tokens(T=4), 12)  # 16 tokens: the last steps see only the last 12
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(model.generate(tokens(T=4), 12, top_k=1, generator=gen), expected)
    assert torch.equal(model.generate(tokens(T=4), 12, temperature=1e-6, generator=gen), expected)


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_temperature_must_be_positive(temperature):
    with pytest.raises(ValueError, match=f"temperature must be positive, got {temperature}"):
        make_model().generate(tokens(T=4), 1, temperature=temperature)



def test_rms_norm_divides_by_the_root_mean_square_plus_eps():
    x = torch.tensor([[3.0, 4.0]])  # mean square 12.5
    assert RMSNorm(2, eps=0.0)(x)[0].tolist() == pytest.approx([3 / 12.5**0.5, 4 / 12.5**0.5])
    assert RMSNorm(2, eps=3.5)(x)[0].tolist() == pytest.approx([0.75, 1.0])  # 1 / sqrt(12.5 + 3.5) = 1/4


def test_top_k_above_the_vocabulary_keeps_every_token():
    model = make_model()
    a = model.generate(tokens(T=4), 3, top_k=100, generator=torch.Generator().manual_seed(3))
    b = model.generate(tokens(T=4), 3, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_blocks_whose_weights_exceed_the_memory_are_refused_before_building(monkeypatch):
    import stagewise.nn.transformer as transformer

    # 2 blocks of width 16, ffn 32: 2 * (4*256 + 3*512 + 32) = 5184 float32 values, 20736 bytes
    sizes = dict(n_layer=2, n_embd=16, n_head=2, ffn_hidden=32)
    monkeypatch.setattr(transformer, "physical_memory_gib", lambda: 20736 / 2**30)
    TransformerOptions(**sizes)  # exactly fits
    monkeypatch.setattr(transformer, "physical_memory_gib", lambda: 20735 / 2**30)
    with pytest.raises(ValueError, match=r"^n_layer: 2 blocks of n_embd = 16 and ffn_hidden = 32 need 1\.93e-05 GiB "
                                         r"for their weights alone, more than this machine's 1\.93e-05 GiB; lower"):
        TransformerOptions(**sizes)
    monkeypatch.setattr(transformer, "physical_memory_gib", lambda: None)  # a platform that does not say
    TransformerOptions(n_layer=10**12)  # was: building a trillion blocks ran for ever


def test_the_block_weights_counted_are_the_model_s():
    model = make_model()
    d, f = CONFIG["n_embd"], CONFIG["ffn_hidden"]
    assert sum(p.numel() for p in model.layers.parameters()) == CONFIG["n_layer"] * (4 * d * d + 3 * d * f + 2 * d)
