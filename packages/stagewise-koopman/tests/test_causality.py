"""With the Koopman modules attached and trained, logits at t never depend on tokens after t."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from stagewise_koopman.forward_mode import koopman_forward_logits
from stagewise_koopman.loss import KoopmanOperator, KoopmanOptions

from stagewise.nn.transformer import TransformerConfig, TransformerLM

T = 10


def trained(axis: str) -> tuple[TransformerLM, KoopmanOperator]:
    """A 3-block model and a Koopman term trained together for a few steps (weight 1)."""
    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(vocab_size=50, n_layer=3, n_embd=16, n_head=2, ffn_hidden=32))
    term = KoopmanOperator(KoopmanOptions(koopman_dim=8, axis=axis, steps=2)).build(4, 16)
    optimizer = torch.optim.AdamW([*model.parameters(), *term.parameters()], lr=1e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        idx = torch.randint(0, 50, (4, T + 1), generator=g)
        out = model(idx[:, :-1], return_hidden=True)
        loss = F.cross_entropy(out["logits"].flatten(0, 1), idx[:, 1:].flatten())
        loss = loss + sum(term(out, {}, None).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), term


def assert_causal(logits_of) -> None:
    g = torch.Generator().manual_seed(2)
    idx = torch.randint(0, 50, (2, T), generator=g)
    for t in range(T - 1):
        changed = idx.clone()
        changed[:, t + 1 :] = (changed[:, t + 1 :] + 7) % 50  # every token after t differs
        a, b = logits_of(idx), logits_of(changed)
        assert torch.equal(a[:, : t + 1], b[:, : t + 1]), f"logits at positions <= {t} changed"
        assert not torch.equal(a[:, t + 1 :], b[:, t + 1 :])  # the test can see a change


@pytest.mark.parametrize("axis", ["depth", "time"])
def test_lm_logits_are_causal_with_the_term_trained(axis):
    model, _ = trained(axis)
    with torch.no_grad():
        assert_causal(lambda idx: model(idx)["logits"])


def test_koopman_forward_mode_is_causal():
    model, term = trained("depth")
    with torch.no_grad():
        assert_causal(lambda idx: koopman_forward_logits(model, term, model(idx, return_hidden=True)["hidden"], 2))


def test_forward_mode_refuses_a_time_operator():
    model, term = trained("time")
    with pytest.raises(ValueError, match="needs a depth operator from layer 1"):
        koopman_forward_logits(model, term, model(torch.zeros(1, T, dtype=torch.long), return_hidden=True)["hidden"], 2)


def test_forward_mode_uses_the_operator_of_its_source_layer_k_times():
    """A term with source layer 1 only (its operator sits at index 0): replacing the last two of
    three blocks is the head on ψ(K² φ(h_1)), computed here from the raw parameters."""
    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(vocab_size=50, n_layer=3, n_embd=16, n_head=2, ffn_hidden=32)).eval()
    term = KoopmanOperator(KoopmanOptions(koopman_dim=8, layers=[1], steps=2)).build(4, 16)
    m = term.koopman
    with torch.no_grad():
        m.operator.copy_(torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(3)) / 3)
        m.lift_bias.normal_()
        m.decode_bias.normal_()
        idx = torch.randint(0, 50, (2, T), generator=torch.Generator().manual_seed(4))
        hidden = model(idx, return_hidden=True)["hidden"]
        h = hidden[1]
        h_hat = h / (h.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
        z = torch.tanh(h_hat @ m.lift_weight[0] + m.lift_bias[0]) @ m.operator[0].T @ m.operator[0].T
        expected = model.logits_from_hidden(z @ m.decode_weight[0] + m.decode_bias[0])
        torch.testing.assert_close(koopman_forward_logits(model, term, hidden, 2), expected, rtol=1e-5, atol=1e-5)
