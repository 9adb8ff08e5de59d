"""The DMD refresh recovers a known linear operator from synthetic linear dynamics."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from stagewise_koopman.dmd import blend, dmd_operator
from stagewise_koopman.loss import KoopmanOperator, KoopmanOptions


def linear_system(n: int = 2, N: int = 200, D: int = 5, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Known operators A (n, D, D) with spectral radius < 1, states x and their images y = A x."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, D, D, generator=g)
    A = 0.9 * A / torch.linalg.eigvals(A).abs().max(-1).values[:, None, None]
    x = torch.randn(n, N, D, generator=g)
    return A, x, x @ A.transpose(1, 2)


def test_dmd_recovers_the_operator():
    A, x, y = linear_system()
    torch.testing.assert_close(dmd_operator(x, y), A, rtol=1e-4, atol=1e-5)


def test_dmd_of_a_trajectory_recovers_the_operator():
    A, x, _ = linear_system(n=1, D=3)
    states = [x[:, 0]]
    for _ in range(40):  # one trajectory z_{t+1} = A z_t
        states.append(states[-1] @ A[0].T)
    trajectory = torch.stack(states, 1)  # (1, 41, 3)
    torch.testing.assert_close(dmd_operator(trajectory[:, :-1], trajectory[:, 1:]), A, rtol=1e-3, atol=1e-4)


def test_blend_moves_by_the_rate():
    K, fitted = torch.zeros(1, 2, 2), torch.ones(1, 2, 2)
    assert torch.equal(blend(K, fitted, 0.25), torch.full((1, 2, 2), 0.25))


def test_term_refresh_uses_only_a_full_buffer_of_fresh_pairs():
    A, x, y = linear_system(n=3, N=16, D=4)
    term = KoopmanOperator(KoopmanOptions(koopman_dim=4, dmd_every=2, dmd_rate=1.0, dmd_buffer=16)).build(4, 8)
    term._record(x[:, :8], y[:, :8])  # 8 pairs per step: half the buffer
    assert term.refresh_operator() is False
    term._record(x[:, 8:], y[:, 8:])
    assert term.refresh_operator() is True
    torch.testing.assert_close(term.koopman.operator.detach(), A, rtol=1e-4, atol=1e-5)
    assert term.refresh_operator() is False  # nothing fresh since


def test_refresh_blends_at_the_rate():
    A, x, y = linear_system(n=3, N=16, D=4)
    term = KoopmanOperator(KoopmanOptions(koopman_dim=4, dmd_every=1, dmd_rate=0.1, dmd_buffer=16)).build(4, 8)
    term._record(x, y)
    term.refresh_operator()
    expected = 0.9 * torch.eye(4) + 0.1 * A
    torch.testing.assert_close(term.koopman.operator.detach(), expected, rtol=1e-4, atol=1e-5)


def test_each_step_records_enough_pairs_to_refresh_every_dmd_every_steps():
    # ⌈16 / 3⌉ = 6 pairs per step: three steps refill the 16-pair buffer (two would not)
    A, x, y = linear_system(n=3, N=10, D=4)
    term = KoopmanOperator(KoopmanOptions(koopman_dim=4, dmd_every=3, dmd_rate=1.0, dmd_buffer=16)).build(4, 8)
    for _ in range(2):
        term._record(x, y)
        assert term.refresh_operator() is False
    term._record(x, y)
    assert int(term.dmd_fresh) == 18 and term.refresh_operator() is True
    torch.testing.assert_close(term.koopman.operator.detach(), A, rtol=1e-4, atol=1e-5)


def test_only_training_passes_record_pairs_for_the_refresh():
    g = torch.Generator().manual_seed(5)
    hidden = [torch.randn(2, 6, 8, generator=g) for _ in range(4)]
    term = KoopmanOperator(KoopmanOptions(koopman_dim=4, dmd_every=2, dmd_buffer=16)).build(4, 8)
    with torch.no_grad():
        term({"hidden": hidden}, {}, None)  # an evaluation pass
    assert int(term.dmd_seen) == 0 and int(term.dmd_fresh) == 0
    term({"hidden": hidden}, {}, None)
    term.end_step(trained=True)  # the pairs enter the buffer when the step has trained the term
    assert int(term.dmd_seen) == 8 and int(term.dmd_fresh) == 8  # ⌈16 / 2⌉ pairs of this step


def _step_ends(term, loss, weight, step=1):
    """The plugin's after-step event for one term named "koopman" at ``weight`` this epoch."""
    from stagewise_koopman import events

    from stagewise.engine.distributed import DistInfo

    state = SimpleNamespace(terms={"koopman": term}, term_weights={"koopman": weight}, step=step, dist=DistInfo())
    events.after_step(state, loss)


def _dmd_term(dmd_every=2):
    return KoopmanOperator(KoopmanOptions(koopman_dim=4, dmd_every=dmd_every, dmd_rate=1.0, dmd_buffer=8)).build(4, 8)


def test_a_skipped_non_finite_batch_leaves_no_pairs_for_the_refresh():
    hidden = [torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    term = _dmd_term(dmd_every=1)
    term({"hidden": [h.clone() for h in hidden[:3]] + [torch.full((2, 6, 8), float("nan"))]}, {}, None)
    _step_ends(term, float("nan"), 0.2)  # the engine skipped the batch: no pairs, no refresh
    assert int(term.dmd_seen) == 0 and torch.equal(term.koopman.operator, torch.eye(4).repeat(3, 1, 1))
    term({"hidden": hidden}, {}, None)
    _step_ends(term, 1.5, 0.2)  # a trained step fills the 8-pair buffer and refreshes K from finite pairs
    assert int(term.dmd_seen) == 8 and torch.isfinite(term.koopman.operator).all()
    assert not torch.equal(term.koopman.operator, torch.eye(4).repeat(3, 1, 1))


def test_a_term_at_weight_zero_records_no_pairs_even_when_computed():
    # under torchrun the engine computes a term at weight 0 (DDP wants it in the graph); one process would not
    term = _dmd_term()
    term({"hidden": [torch.randn(2, 6, 8) for _ in range(4)]}, {}, None)
    _step_ends(term, 1.5, 0.0, step=2)
    assert int(term.dmd_seen) == 0 and term.pending is None


def test_only_a_steps_first_pass_is_recorded():
    # L-BFGS evaluates a batch again in its line search; the engine records only the first evaluation
    g = torch.Generator().manual_seed(3)
    first, again = ([torch.randn(2, 6, 8, generator=g) for _ in range(4)] for _ in range(2))
    torch.manual_seed(0)
    term = _dmd_term()
    term({"hidden": first}, {}, None)
    term({"hidden": again}, {}, None)
    _step_ends(term, 1.5, 0.2)
    torch.manual_seed(0)
    once = _dmd_term()  # the same φ, K, ψ, shown the first pass alone
    once({"hidden": first}, {}, None)
    once.end_step(trained=True)
    assert int(term.dmd_seen) == 4 and torch.equal(term.dmd_x, once.dmd_x) and torch.equal(term.dmd_y, once.dmd_y)
