"""The shared transformer: shapes, causality, exits, hidden states, errors, determinism."""

from types import SimpleNamespace

import pytest
import torch

from stagewise.data.splits import DataSplits
from stagewise.nn.transformer import TransformerConfig, TransformerLM, TransformerOptions

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
    (dict(n_layer=0), "n_layer must be a positive integer"),
    (dict(vocab_size=0), "vocab_size must be a positive integer"),
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
