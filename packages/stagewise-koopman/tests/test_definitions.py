"""The term, the spectral penalty, the DMD fit and forward mode against computations written from the
definitions (plain float64 torch and numpy), not from the plugin's code.

Per source layer l: ĥ = h / sqrt(mean(h²) + 1e-6), φ(h) = tanh(ĥ W + b), ψ(z) = z U + c. For k = 1..steps
the pairs are (h_l, h_{l+k}) at every position where l + k ≤ L (depth), or (h_l[t], h_l[t+k]) within each
sequence for t < T − steps (time). lifted: d(K^k φ(h), φ(h′)) in units of the spread of φ(h′) (unbiased
variance over tokens, mean over D, + 1e-6; not trained through); each part is the mean over k of the mean
over the layers that have the pair.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from stagewise_koopman.dmd import dmd_operator
from stagewise_koopman.forward_mode import koopman_forward_logits
from stagewise_koopman.loss import KoopmanOperator, KoopmanOptions
from stagewise_koopman.operator import KoopmanModules

from stagewise.nn.transformer import TransformerConfig, TransformerLM

EPS = 1e-6


def random_term(options: KoopmanOptions, n_hidden: int, width: int, seed: int = 0) -> KoopmanOperator:
    """A float64 term with every parameter drawn at random (not the identity K of a fresh term)."""
    term = KoopmanOperator(options).build(n_hidden, width).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in term.koopman.parameters():
            p.copy_(0.7 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return term


def random_hidden(n_hidden: int, B: int = 2, T: int = 6, C: int = 5) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [(1 + i) * torch.randn(B, T, C, generator=g, dtype=torch.float64, requires_grad=True)
            for i in range(n_hidden)]


def pairs(hidden: list[torch.Tensor], layer: int, o: KoopmanOptions) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Source states (M, C) of ``layer`` and, by k, the states k steps later (M, C)."""
    if o.axis == "depth":
        later = {k: hidden[layer + k] for k in range(1, o.steps + 1) if layer + k < len(hidden)}
        return hidden[layer].flatten(0, 1), {k: h.flatten(0, 1) for k, h in later.items()}
    T = hidden[layer].shape[1]
    later = {k: hidden[layer][:, k:T - o.steps + k].flatten(0, 1) for k in range(1, o.steps + 1)}
    return hidden[layer][:, :T - o.steps].flatten(0, 1), later


def norm(h: torch.Tensor) -> torch.Tensor:
    return h / (h.pow(2).mean(-1, keepdim=True) + EPS).sqrt()


def reference_parts(hidden: list[torch.Tensor], term: KoopmanOperator) -> dict[str, torch.Tensor]:
    """lifted, one_step, reconstruction, state as the module docstring defines them."""
    o, m = term.options, term.koopman
    d = F.mse_loss if o.distance == "mse" else F.smooth_l1_loss
    reconstruction, lifted, state = [], {}, {}
    for i, layer in enumerate(term.sources):
        W, b, K, U, c = m.lift_weight[i], m.lift_bias[i], m.operator[i], m.decode_weight[i], m.decode_bias[i]
        h, later = pairs(hidden, layer, o)
        if o.detach == "source":
            h = h.detach()
        if o.detach == "target":
            later = {k: y.detach() for k, y in later.items()}
        z = torch.tanh(norm(h) @ W + b)  # φ(h)
        reconstruction.append(d(z @ U + c, norm(h)))
        for k, y in later.items():
            pred, zy = z @ torch.linalg.matrix_power(K, k).T, torch.tanh(norm(y) @ W + b)
            scale = (zy.detach().var(0).mean() + EPS).sqrt()
            lifted.setdefault(k, []).append(d(pred / scale, zy / scale))
            state.setdefault(k, []).append(d(pred @ U + c, norm(y)))

    def mean(values):
        return torch.stack(list(values)).mean()

    return {"lifted": mean(mean(v) for v in lifted.values()), "one_step": mean(lifted[1]),
            "reconstruction": mean(reconstruction), "state": mean(mean(v) for v in state.values())}


CASES = [  # axis, layers, steps; depth [] with steps 2 on h_0..h_3 has no pair h_2 -> h_4: masked
    ("depth", [], 2), ("depth", [1], 1), ("depth", [0, 1], 3), ("time", [], 2), ("time", [0, 3], 3)]


@pytest.mark.parametrize("distance", ["mse", "smooth_l1"])
@pytest.mark.parametrize(("axis", "layers", "steps"), CASES)
def test_parts_are_the_defined_errors(axis, layers, steps, distance):
    o = KoopmanOptions(koopman_dim=3, axis=axis, layers=layers, steps=steps, distance=distance, spectral_weight=0.1)
    term, hidden = random_term(o, 4, 5), random_hidden(4)
    errors, _ = term.errors(hidden)
    expected = reference_parts(hidden, term)
    for part, value in expected.items():
        torch.testing.assert_close(errors[part], value, rtol=1e-10, atol=0, msg=part)
    K = term.koopman.operator.detach().numpy()
    excess = np.maximum(np.linalg.svd(K, compute_uv=False) - 1, 0) ** 2  # (n, D)
    assert errors["spectral"].item() == pytest.approx(excess.sum(-1).mean(), rel=1e-10)


@pytest.mark.parametrize("detach", ["none", "source", "target"])
@pytest.mark.parametrize("axis", ["depth", "time"])  # time: a source and a later state share one tensor
def test_detach_stops_the_gradient_of_exactly_one_side_of_each_pair(axis, detach):
    o = KoopmanOptions(koopman_dim=3, axis=axis, layers=[1, 2], steps=2, detach=detach,
                       lifted_weight=2.0, reconstruction_weight=0.5, state_weight=1.5)
    term, hidden = random_term(o, 4, 5), random_hidden(4)
    weights = o.part_weights()
    expected = sum(weights[part] * value for part, value in reference_parts(hidden, term).items() if part in weights)
    inputs = [*hidden, *term.koopman.parameters()]
    got = torch.autograd.grad(sum(term({"hidden": hidden}, {}, None).values()), inputs, allow_unused=True)
    want = torch.autograd.grad(expected, inputs, allow_unused=True)
    for i, (a, b, x) in enumerate(zip(got, want, inputs, strict=True)):  # None (no path to it): a zero gradient
        a, b = (torch.zeros_like(x) if g is None else g for g in (a, b))
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=f"input {i}")


def rotation(angle: float) -> np.ndarray:
    return np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])


ADVERSARIAL = {  # K -> its spectral radius
    "complex pair on the circle": (rotation(0.7), 1.0),
    "complex pair outside": (1.2 * rotation(0.7), 1.2),
    "eigenvalue exactly 1": (np.eye(2), 1.0),
    "eigenvalue -1": (-np.eye(2), 1.0),
    "defective, eigenvalue 1": (np.array([[1.0, 1.0], [0.0, 1.0]]), 1.0),  # σ_max = golden ratio: penalised
    "defective, eigenvalue 0.5": (np.array([[0.5, 100.0], [0.0, 0.5]]), 0.5),
    "huge norm": (1e6 * np.eye(2), 1e6),
}


@torch.no_grad()
def spectral_penalty(K: np.ndarray, modules: KoopmanModules | None = None) -> float:
    """The penalty of one operator K (D, D), in ``modules`` (one layer of width D) or new ones."""
    modules = modules or KoopmanModules(n=1, width=2, dim=K.shape[0]).double()
    modules.operator.copy_(torch.from_numpy(K)[None])
    return modules.spectral_excess().item()


@pytest.mark.parametrize("name", ADVERSARIAL)
def test_spectral_penalty_is_zero_only_where_every_eigenvalue_is_in_the_closed_unit_disc(name):
    K, radius = ADVERSARIAL[name]
    assert np.abs(np.linalg.eigvals(K)).max() == pytest.approx(radius)
    sigma = np.linalg.svd(K, compute_uv=False)
    assert spectral_penalty(K) == pytest.approx((np.maximum(sigma - 1, 0) ** 2).sum(), rel=1e-9, abs=1e-12)
    assert (spectral_penalty(K) == 0) == (sigma.max() <= 1 + 1e-12)  # σ_max ≤ 1 bounds ρ: 0 only inside the disc
    assert spectral_penalty(K) > 0 or radius <= 1


def test_a_random_operator_outside_the_unit_disc_is_always_penalised():
    rng, modules = np.random.default_rng(0), KoopmanModules(n=1, width=2, dim=4).double()
    for K in np.array([0.1, 0.4, 1.0, 3.0])[:, None, None, None] * rng.standard_normal((4, 100, 4, 4)):
        for k in K:
            penalty, radius = spectral_penalty(k, modules), np.abs(np.linalg.eigvals(k)).max()
            assert penalty > 0 or radius <= 1 + 1e-9
            assert (penalty == 0) == (np.linalg.svd(k, compute_uv=False).max() <= 1)


def lstsq_operator(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """K with y ≈ x Kᵀ per layer: numpy's minimum-norm least squares, the same rank cut."""
    return np.stack([np.linalg.lstsq(xi, yi, rcond=1e-6)[0].T for xi, yi in zip(x, y, strict=True)])


@pytest.mark.parametrize(("count", "rank"), [(40, 6), (40, 3), (4, 4), (20, 1)])  # full, deficient, fewer than D
def test_dmd_is_numpys_minimum_norm_least_squares_fit(count, rank):
    rng = np.random.default_rng(rank)
    x = (rng.standard_normal((2, count, rank)) @ rng.standard_normal((2, rank, 6))).astype(np.float32)
    y = rng.standard_normal((2, count, 6)).astype(np.float32)
    fitted = dmd_operator(torch.from_numpy(x), torch.from_numpy(y))
    expected = lstsq_operator(x.astype(np.float64), y.astype(np.float64))
    np.testing.assert_allclose(fitted.numpy(), expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    assert torch.equal(fitted, dmd_operator(torch.from_numpy(x), torch.from_numpy(y)))  # deterministic


def test_refresh_blends_numpys_fit_of_the_buffer_into_any_operator():
    g = torch.Generator().manual_seed(2)
    x, y, K = torch.randn(2, 16, 4, generator=g), torch.randn(2, 16, 4, generator=g), torch.randn(2, 4, 4, generator=g)
    term = KoopmanOperator(KoopmanOptions(koopman_dim=4, dmd_every=1, dmd_rate=0.3, dmd_buffer=16)).build(3, 8)
    with torch.no_grad():
        term.koopman.operator.copy_(K)
    term._record(x, y)
    assert term.refresh_operator()
    expected = 0.7 * K.double().numpy() + 0.3 * lstsq_operator(x.double().numpy(), y.double().numpy())
    np.testing.assert_allclose(term.koopman.operator.detach().numpy(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("replace", [1, 2, 3])
def test_forward_mode_replaces_blocks_l_plus_1_to_L_by_psi_of_k_to_the_L_minus_l(replace):
    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(vocab_size=30, n_layer=3, n_embd=8, n_head=2, ffn_hidden=16)).eval()
    term = random_term(KoopmanOptions(koopman_dim=5), 4, 8).float()  # depth, sources 0, 1, 2
    idx = torch.randint(0, 30, (2, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        hidden = model(idx, return_hidden=True)["hidden"]
        layer = 3 - replace
        P = {k: v.double().numpy()[layer] for k, v in term.koopman.state_dict().items()}  # source l sits at index l
        h = hidden[layer].double().numpy()
        z = np.tanh(h / np.sqrt((h**2).mean(-1, keepdims=True) + EPS) @ P["lift_weight"] + P["lift_bias"])
        z = z @ np.linalg.matrix_power(P["operator"], replace).T
        expected = model.logits_from_hidden(torch.from_numpy(z @ P["decode_weight"] + P["decode_bias"]).float())
        torch.testing.assert_close(koopman_forward_logits(model, term, hidden, replace), expected,
                                   rtol=1e-5, atol=1e-5)
