"""The term's parts on hand-made hidden states: axes, multi-step, masks, spectral constraint."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from stagewise_koopman.linearity import fit_post_hoc
from stagewise_koopman.loss import KoopmanOperator, KoopmanOptions, gather_pairs, relative_distance, source_layers
from stagewise_koopman.operator import EPS, KoopmanModules

from stagewise.nn.transformer import TransformerConfig, TransformerLM


def hidden_states(n: int = 4, B: int = 2, T: int = 6, C: int = 8, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, C, generator=g) for _ in range(n)]


def test_default_sources_cover_every_step_of_the_axis():
    assert source_layers(KoopmanOptions(axis="depth"), n_hidden=4) == [0, 1, 2]
    assert source_layers(KoopmanOptions(axis="time"), n_hidden=4) == [1, 2, 3]
    assert source_layers(KoopmanOptions(layers=[2, 0, 2]), n_hidden=4) == [0, 2]


def test_depth_pairs_mask_steps_past_the_last_layer():
    hidden = hidden_states()
    states, mask = gather_pairs(hidden, [0, 1, 2], KoopmanOptions(steps=2))
    assert states.shape == (3, 3, 2 * 6, 8)
    assert mask.tolist() == [[True, True, True], [True, True, True], [True, True, False]]
    torch.testing.assert_close(states[1, 2], hidden[3].flatten(0, 1))


def test_time_pairs_are_positions_k_apart_within_a_layer():
    hidden = hidden_states()
    states, mask = gather_pairs(hidden, [2], KoopmanOptions(axis="time", steps=2))
    assert states.shape == (1, 3, 2 * 4, 8) and mask.all()
    torch.testing.assert_close(states[0, 2], hidden[2][:, 2:6].flatten(0, 1))  # t + 2 for t < T - 2


def test_forward_returns_only_the_weighted_parts_that_are_on():
    term = KoopmanOperator(KoopmanOptions(koopman_dim=4, steps=2, state_weight=0.0, lifted_weight=2.0)).build(4, 8)
    parts = term({"hidden": hidden_states()}, {}, None)
    assert sorted(parts) == ["lifted", "reconstruction"]
    errors, _ = term.errors(hidden_states())
    torch.testing.assert_close(parts["lifted"], 2.0 * errors["lifted"])


def test_linear_dynamics_in_lifted_space_give_zero_lifted_error():
    # h_{l+1} = h_l: φ(h_{l+1}) = φ(h_l), and K = I (its initial value) predicts it exactly
    h = hidden_states(n=1)[0]
    term = KoopmanOperator(KoopmanOptions(koopman_dim=4, steps=2)).build(3, 8)
    errors, _ = term.errors([h, h, h])
    assert errors["lifted"].item() == 0.0 and errors["one_step"].item() == 0.0


def test_multi_step_parts_apply_k_to_the_power_k():
    """steps = 2, one source layer: k = 1 pairs K φ(h_0) with h_1 and k = 2 pairs K² φ(h_0) with h_2,
    computed here from the raw parameters (with K = I, as at initialisation, K and K² are alike)."""
    hidden = hidden_states(n=3)
    options = KoopmanOptions(koopman_dim=4, layers=[0], steps=2)
    term = KoopmanOperator(options).build(3, 8)
    m = term.koopman
    with torch.no_grad():
        m.operator.copy_(torch.randn(1, 4, 4, generator=torch.Generator().manual_seed(1)))
    h_hat = [(h / (h.pow(2).mean(-1, keepdim=True) + EPS).sqrt()).reshape(1, -1, 8) for h in hidden]
    z = [torch.tanh(h @ m.lift_weight + m.lift_bias[:, None]) for h in h_hat]
    pred = [z[0] @ torch.linalg.matrix_power(m.operator[0], k).T for k in (1, 2)]
    lifted = [relative_distance(p, z[k + 1], options) for k, p in enumerate(pred)]
    state = [F.mse_loss(p @ m.decode_weight + m.decode_bias[:, None], h_hat[k + 1]) for k, p in enumerate(pred)]
    errors, _ = term.errors(hidden)
    torch.testing.assert_close(errors["one_step"], lifted[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(errors["lifted"], (lifted[0][0] + lifted[1][0]) / 2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(errors["state"], (state[0] + state[1]) / 2, rtol=1e-5, atol=1e-6)


def test_spectral_penalty_is_zero_inside_the_unit_disc_and_pulls_outliers_in():
    modules = KoopmanModules(n=2, width=4, dim=3)
    assert modules.spectral_excess().item() == 0.0  # identity: every singular value is 1
    with torch.no_grad():
        modules.operator.mul_(1.5)
    before = modules.spectral_excess().item()
    assert before == pytest.approx(3 * 0.5**2)  # per layer: three singular values of 1.5, each 0.5 too large
    optimizer = torch.optim.SGD([modules.operator], lr=0.1)
    for _ in range(50):
        optimizer.zero_grad()
        modules.spectral_excess().backward()
        optimizer.step()
    assert modules.spectral_excess().item() < 1e-3 * before
    assert float(modules.eigenvalues().abs().max()) <= 1.0 + 1e-2


def test_parameter_shapes_list_every_parameter_the_modules_make():
    # artifact_problems checks a saved state against these shapes: a parameter added to one list only would
    # refuse every saved term (or let a wrong one through)
    made = {name: tuple(p.shape) for name, p in KoopmanModules(n=2, width=5, dim=3).state_dict().items()}
    assert made == KoopmanModules.shapes(n=2, width=5, dim=3)


def test_artifact_rebuilds_the_same_modules():
    term = KoopmanOperator(KoopmanOptions(koopman_dim=4, steps=2)).build(4, 8)
    rebuilt = KoopmanOperator.from_artifact(term.artifact())
    assert rebuilt.sources == term.sources and rebuilt.options == term.options
    for (name, a), (_, b) in zip(term.koopman.state_dict().items(), rebuilt.koopman.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_a_stage_s_terms_join_the_terms_earlier_stages_handed_on():
    """A second stage training term "b" keeps the artifact of term "a" from an earlier stage."""
    from stagewise_koopman.events import after_stage
    from stagewise_koopman.loss import ARTIFACT

    first, second = (KoopmanOperator(KoopmanOptions(koopman_dim=4)).build(4, 8) for _ in range(2))
    state = SimpleNamespace(terms={"b": second, "ce": object()}, artifacts={ARTIFACT: {"a": first.artifact()}})
    after_stage(state)
    assert sorted(state.artifacts[ARTIFACT]) == ["a", "b"]
    assert torch.equal(state.artifacts[ARTIFACT]["b"]["state"]["operator"], second.koopman.operator)


def test_detach_keeps_the_backbone_gradient_off_one_side_of_each_pair():
    def grads(detach: str) -> list[bool]:
        hidden = [h.requires_grad_() for h in hidden_states(n=3)]
        term = KoopmanOperator(KoopmanOptions(koopman_dim=4, layers=[0], detach=detach)).build(3, 8)
        sum(term({"hidden": hidden}, {}, None).values()).backward()
        return [h.grad is not None and bool(h.grad.abs().sum() > 0) for h in hidden]

    assert grads("none") == [True, True, False]
    assert grads("target") == [True, False, False]  # h_1 is a fixed target; h_0 is pulled
    assert grads("source") == [False, True, False]


def test_the_term_normalises_the_states_once_for_the_lift_and_the_targets(monkeypatch):
    # φ lifts ĥ and ψ's targets are ĥ: the term computed ĥ twice, once inside φ and once for the targets
    import stagewise_koopman.loss
    import stagewise_koopman.operator

    original, calls = stagewise_koopman.operator.normalize_state, []

    def counting(h):
        calls.append(h.shape)
        return original(h)

    for module in (stagewise_koopman.loss, stagewise_koopman.operator):
        monkeypatch.setattr(module, "normalize_state", counting)
    hidden = hidden_states()
    term = KoopmanOperator(KoopmanOptions(koopman_dim=4, steps=2)).build(4, 8)
    _, lifted = term.errors(hidden)
    assert len(calls) == 1
    # the lift of the shared ĥ is φ of the raw states, as forward mode computes it (to rounding: the
    # two batch the matrix products differently, which some CPUs' kernels sum in another order)
    states, _ = gather_pairs(hidden, term.sources, term.options)
    torch.testing.assert_close(lifted[:, 0], term.koopman.lift(states[:, 0]), rtol=0, atol=1e-6)


def test_a_single_token_pair_has_zero_spread_not_nan():
    hidden = hidden_states(B=1, T=1)  # one position: one pair per layer
    errors, _ = KoopmanOperator(KoopmanOptions(koopman_dim=4, steps=2)).build(4, 8).errors(hidden)
    assert all(bool(torch.isfinite(value)) for value in errors.values()), errors
    pred, target = torch.randn(2, 1, 4), torch.randn(2, 1, 4)
    torch.testing.assert_close(relative_distance(pred, target, KoopmanOptions()),
                               F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2)) / EPS)


def test_depth_steps_past_every_source_layer_are_refused():
    with pytest.raises(ValueError, match="steps 2 reaches past the last hidden state h_3 .* must be <= 1"):
        KoopmanOperator(KoopmanOptions(layers=[2], steps=2)).build(4, 8)
    term = KoopmanOperator(KoopmanOptions(layers=[1, 2], steps=2)).build(4, 8)  # layer 1 has a pair at k = 2
    assert all(bool(torch.isfinite(value)) for value in term.errors(hidden_states())[0].values())


def test_model_check_knows_the_hidden_states_of_a_model_with_n_layer():
    term = KoopmanOperator(KoopmanOptions(layers=[3]))
    assert term.check(SimpleNamespace(n_layer=4)) == []
    assert term.check(SimpleNamespace(n_layer=3)) == [
        "layers [3] are out of range for axis 'depth': the model has hidden states h_0..h_3, so source "
        "layers go up to 2"]
    assert term.check(SimpleNamespace()) == []  # no n_layer: checked when the stage starts


def test_post_hoc_fit_refuses_time_steps_as_long_as_the_sequence():
    model = TransformerLM(TransformerConfig(vocab_size=20, n_layer=1, n_embd=8, n_head=2, ffn_hidden=16))
    batch = {"input": torch.zeros(2, 8, dtype=torch.long)}
    with pytest.raises(ValueError, match="steps 8 must be below the sequence length 8 for axis 'time'"):
        fit_post_hoc(model, lambda epoch: [batch], KoopmanOptions(koopman_dim=4, axis="time", steps=8), 2, 1e-3)


def test_operator_change_is_measured_since_the_last_call():
    term = KoopmanOperator(KoopmanOptions(koopman_dim=2)).build(3, 8)  # depth: sources 0, 1; K = I
    with torch.no_grad():
        term.koopman.operator[0] += torch.tensor([[0.3, 0.0], [0.0, -0.1]])
    change = term.operator_change()
    assert change["K0/change"] == pytest.approx(0.1)  # mean |ΔK| = (0.3 + 0.1) / 4
    assert change["K0/change_pct"] == pytest.approx(100 * (0.1 ** 0.5) / (2 ** 0.5))  # ‖ΔK‖ / ‖I‖ in %
    assert change["K1/change"] == 0.0 and change["K1/change_pct"] == 0.0
    assert term.operator_change() == {"K0/change": 0.0, "K0/change_pct": 0.0, "K1/change": 0.0, "K1/change_pct": 0.0}
    with torch.no_grad():
        term.koopman.operator[1, 0, 1] = 0.4  # K1 = [[1, 0.4], [0, 1]]
    change = term.operator_change()
    assert change["K0/change"] == 0.0  # K0's earlier change is not counted again
    assert change["K1/change"] == pytest.approx(0.1) and change["K1/change_pct"] == pytest.approx(100 * 0.4 / 2 ** 0.5)


def test_spectral_radius_is_the_largest_eigenvalue_modulus():
    from stagewise_koopman.forward_mode import spectral_radii

    term = KoopmanOperator(KoopmanOptions(koopman_dim=2)).build(3, 8)
    with torch.no_grad():
        term.koopman.operator[0] = torch.tensor([[0.0, -0.5], [0.5, 0.0]])  # a rotation: eigenvalues ±0.5i
        term.koopman.operator[1] = torch.tensor([[-0.9, 0.0], [0.0, 0.2]])  # eigenvalues -0.9, 0.2
    radii = spectral_radii(term)
    assert radii == {0: pytest.approx(0.5), 1: pytest.approx(0.9)}


class _FixedHidden(torch.nn.Module):
    """A stand-in model whose hidden states are given."""

    def __init__(self, hidden):
        super().__init__()
        self.hidden = hidden

    def forward_batch(self, batch, needs):
        return {"hidden": self.hidden}


def test_linearity_error_per_source_layer_belongs_to_that_layer():
    from stagewise_koopman.linearity import one_step_error

    h, g = hidden_states(n=2)
    term = KoopmanOperator(KoopmanOptions(koopman_dim=4)).build(3, 8)  # depth: sources 0, 1
    with torch.no_grad():  # K0 = I; K1 anything but I (K1² ≠ K1)
        term.koopman.operator[1] = torch.randn(4, 4, generator=torch.Generator().manual_seed(3))
    # h_1 = h_0: layer 0's step is the identity, which K0 = I predicts exactly; h_2 is unrelated
    overall, per_layer = one_step_error(_FixedHidden([h, h, g]), term, [{"input": torch.zeros(2, 6)}])
    assert per_layer[0] == 0.0
    with torch.no_grad():  # by hand: ‖z K1ᵀ − φ1(h_2)‖² over the spread of φ1(h_2), unbiased over tokens
        j = slice(1, 2)
        z, target = term.koopman.lift(h.reshape(1, 12, 8), j)[0], term.koopman.lift(g.reshape(1, 12, 8), j)[0]
        pred = z @ term.koopman.operator[1].T
        expected = float(((pred - target) ** 2).mean() / (target.var(0).mean() + EPS))
    assert per_layer[1] == pytest.approx(expected, rel=1e-5)
    assert overall == pytest.approx((per_layer[0] + per_layer[1]) / 2, rel=1e-6)
    # two batches of the same states: the same means, over the sequences of both (not over the layers)
    twice = one_step_error(_FixedHidden([h, h, g]), term, [{"input": torch.zeros(2, 6)}] * 2)
    assert twice == (pytest.approx(overall, rel=1e-6), pytest.approx(per_layer, rel=1e-6))


class _BatchHidden(torch.nn.Module):
    """A stand-in model whose hidden states come with the batch."""

    def forward_batch(self, batch, needs):
        return {"hidden": batch["hidden"]}


def test_linearity_error_weighs_each_batch_by_its_sequences():
    """A batch of 2 sequences and one of 1: the error over both is (2·e_a + e_b) / 3, not the batches' mean."""
    from stagewise_koopman.linearity import one_step_error

    term = KoopmanOperator(KoopmanOptions(koopman_dim=4)).build(3, 8)
    a, b = ({"input": torch.zeros(B, 6), "hidden": hidden_states(n=3, B=B, seed=B)} for B in (2, 1))
    (e_a, layers_a), (e_b, layers_b) = (one_step_error(_BatchHidden(), term, [batch]) for batch in (a, b))
    assert e_a != pytest.approx(e_b)  # the weighting shows
    overall, per_layer = one_step_error(_BatchHidden(), term, [a, b])
    assert overall == pytest.approx((2 * e_a + e_b) / 3, rel=1e-6)
    assert per_layer == pytest.approx({layer: (2 * layers_a[layer] + layers_b[layer]) / 3 for layer in (0, 1)},
                                      rel=1e-6)


def test_post_hoc_fit_loss_is_the_mean_of_the_last_tenth_of_the_steps():
    model = TransformerLM(TransformerConfig(vocab_size=20, n_layer=2, n_embd=8, n_head=2, ffn_hidden=16)).eval()
    g = torch.Generator().manual_seed(4)
    batches = [{"input": torch.randint(0, 20, (2, 6), generator=g)} for _ in range(3)]
    options = KoopmanOptions(koopman_dim=4)
    torch.manual_seed(7)
    _, fit_loss = fit_post_hoc(model, lambda epoch: batches, options, 20, 5e-2)
    # the same fit by hand: fresh modules (same seed), Adam, the batches in turn
    torch.manual_seed(7)
    term = KoopmanOperator(options).build(3, 8)
    optimizer = torch.optim.Adam(term.parameters(), lr=5e-2)
    losses = []
    for step in range(20):
        with torch.no_grad():
            hidden = model(batches[step % 3]["input"], return_hidden=True)["hidden"]
        loss = sum(term({"hidden": hidden}, {}, None).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 1.5 * losses[-1]  # the fit moves: a mean over other steps would differ
    assert fit_loss == pytest.approx((losses[-2] + losses[-1]) / 2, rel=1e-5)  # steps 18 and 19


def test_forward_eval_accepts_exactly_the_source_layer_that_replace_layers_needs():
    from stagewise_koopman.stages import ForwardEval, ForwardEvalOptions

    def problems(replace, **term):
        return ForwardEval(ForwardEvalOptions(replace_layers=replace)).replace_problems(
            KoopmanOptions(**term), n_layer=3, trained_hidden=4)

    assert problems(3, layers=[0], steps=3) == []  # ψ(K³ φ(h_0)) replaces all three blocks
    assert problems(2, layers=[1]) == []
    assert problems(2, layers=[2]) == [  # replacing blocks 2-3 needs layer 1's operator, not layer 2's
        "replacing the last 2 of 3 blocks needs the operator of term 'koopman' from layer 1, but its source "
        "layers are [2]; replace_layers can be: 1"]
    assert problems(1, layers=[0, 1]) == [
        "replacing the last 1 of 3 blocks needs the operator of term 'koopman' from layer 2, but its source "
        "layers are [0, 1]; replace_layers can be: 2, 3"]


def test_evaluation_sums_weigh_each_batch_by_its_sequences():
    term = KoopmanOperator(KoopmanOptions(koopman_dim=4, lifted_weight=2.0)).build(4, 8)
    hidden = hidden_states(B=3)
    with torch.no_grad():  # as the engine's evaluation calls it
        sums = term.eval_sums({"hidden": hidden}, {"input": torch.zeros(3, 6, dtype=torch.long)}, None)
        errors, _ = term.errors(hidden)
    weighted = 2.0 * errors["lifted"] + errors["reconstruction"] + errors["state"]
    assert sums["loss"] == (pytest.approx(3 * float(weighted)), 3.0)
    assert sums["one_step"] == (pytest.approx(3 * float(errors["one_step"])), 3.0)


def test_a_refused_post_hoc_fit_leaves_the_model_in_training_mode():
    model = TransformerLM(TransformerConfig(vocab_size=20, n_layer=1, n_embd=8, n_head=2, ffn_hidden=16))
    batch = {"input": torch.zeros(2, 8, dtype=torch.long)}
    with pytest.raises(ValueError, match="steps 8 must be below the sequence length 8"):
        fit_post_hoc(model, lambda epoch: [batch], KoopmanOptions(koopman_dim=4, axis="time", steps=8), 2, 1e-3)
    assert model.training


def _forward_eval_state(model, batches, term):
    """What ``koopman.forward_eval`` reads of the run state."""
    return SimpleNamespace(artifacts={"koopman.operators": {"koopman": term.artifact()}}, device=torch.device("cpu"),
                           model=model, batches=lambda split, shard, desc=None: batches, run_dir=None,
                           resumed_from=None)


def test_forward_eval_says_what_a_model_without_an_output_head_lacks():
    from stagewise_koopman.stages import ForwardEval, ForwardEvalOptions

    term = KoopmanOperator(KoopmanOptions(koopman_dim=4)).build(3, 8)  # depth: sources 0, 1
    batch = {"input": torch.zeros(2, 6, dtype=torch.long), "target": torch.zeros(2, 6, dtype=torch.long)}
    state = _forward_eval_state(_FixedHidden(hidden_states(n=3)), [batch], term)
    with pytest.raises(ValueError, match="needs the model's output head as logits_from_hidden"):
        ForwardEval(ForwardEvalOptions(replace_layers=1)).run(state)


def test_forward_eval_runs_the_model_once_per_batch():
    from stagewise_koopman.linearity import one_step_error
    from stagewise_koopman.stages import ForwardEval, ForwardEvalOptions

    class Counting(TransformerLM):
        calls = 0

        def forward_batch(self, batch, needs):
            self.calls += 1
            return super().forward_batch(batch, needs)

    torch.manual_seed(0)
    model = Counting(TransformerConfig(vocab_size=20, n_layer=2, n_embd=8, n_head=2, ffn_hidden=16)).eval()
    term = KoopmanOperator(KoopmanOptions(koopman_dim=4)).build(3, 8)
    g = torch.Generator().manual_seed(6)
    batches = [{"input": torch.randint(0, 20, (2, 6), generator=g), "target": torch.randint(0, 20, (2, 6), generator=g)}
               for _ in range(3)]
    metrics = ForwardEval(ForwardEvalOptions(replace_layers=2), label="forward").run(
        _forward_eval_state(model, batches, term))
    assert model.calls == 3
    assert metrics["forward/one_step_error"] == one_step_error(model, term, batches)[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_one_step_error_on_cuda_matches_cpu():
    # the per-layer sums were a CPU tensor, which refuses the CUDA errors added to it
    from stagewise_koopman.linearity import one_step_error

    term = KoopmanOperator(KoopmanOptions(koopman_dim=4)).build(3, 8)
    hidden, batches = hidden_states(n=3), [{"input": torch.zeros(2, 6)}]
    on_cpu = one_step_error(_FixedHidden(hidden), term, batches)
    on_cuda = one_step_error(_FixedHidden([h.cuda() for h in hidden]), term.cuda(), batches)
    assert on_cuda[0] == pytest.approx(on_cpu[0], rel=1e-4)
    assert on_cuda[1] == {layer: pytest.approx(e, rel=1e-4) for layer, e in on_cpu[1].items()}


def test_a_model_without_hidden_states_says_what_the_term_needs():
    from stagewise_koopman.loss import probe_hidden

    class LogitsOnly(torch.nn.Module):
        def forward(self, x):
            return {"logits": x}

    with pytest.raises(ValueError, match=r"koopman\.operator needs a model whose outputs hold 'hidden'.*; "
                                         r"LogitsOnly returned keys \['logits'\]$"):
        probe_hidden(LogitsOnly(), {"input": torch.zeros(2, 3)})
