"""run_rows: the block sees only the kept rows; the others pass through."""

from __future__ import annotations

import pytest
import torch

from stagewise.nn.gates import run_rows


def test_only_kept_rows_are_computed():
    seen = []

    def block(x):
        seen.append(x.shape[0])
        return x * 2 + 1

    h = torch.arange(12.0).reshape(4, 3)
    keep = torch.tensor([True, False, True, False])
    out = run_rows(block, h, keep)
    assert seen == [2]
    assert torch.equal(out[keep], h[keep] * 2 + 1) and torch.equal(out[~keep], h[~keep])


def test_all_and_none():
    h = torch.randn(3, 2)
    assert torch.equal(run_rows(lambda x: x + 1, h, torch.ones(3, dtype=torch.bool)), h + 1)
    assert run_rows(lambda x: x + 1, h, torch.zeros(3, dtype=torch.bool)) is h


def test_gradients_flow_to_kept_rows_only():
    h = torch.randn(4, 2, requires_grad=True)
    run_rows(lambda x: x * 3, h, torch.tensor([True, False, False, True])).sum().backward()
    assert h.grad[:, 0].tolist() == [3.0, 1.0, 1.0, 3.0]


def test_bad_mask_shape():
    with pytest.raises(ValueError, match=r"keep must be a \(B,\) mask"):
        run_rows(lambda x: x, torch.zeros(4, 2), torch.ones(4, 2, dtype=torch.bool))


def test_mask_length_must_match_the_rows():
    with pytest.raises(ValueError, match=r"keep must be a \(B,\) mask for h of shape \(4, 2\), got \(3,\)"):
        run_rows(lambda x: x, torch.zeros(4, 2), torch.ones(3, dtype=torch.bool))
