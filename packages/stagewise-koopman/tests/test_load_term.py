"""stagewise_koopman.load_term: a finished run's trained φ, K, ψ, for Koopman forward mode in Python."""

from __future__ import annotations

import json

import numpy as np
import pytest
import stagewise_koopman
import torch
from conftest import run_tiny
from stagewise_koopman import stages

import stagewise


def test_the_readme_snippet_gives_the_logits_the_forward_stage_computed(tmp_path, monkeypatch):
    seen = []  # (input ids, forward-mode logits) of each batch the `forward` stage evaluated
    frozen_hidden, forward_logits = stages.frozen_hidden, stages.koopman_forward_logits

    def recording_hidden(model, batch):
        seen.append([batch["input"]])
        return frozen_hidden(model, batch)

    def recording_logits(*args):
        seen[-1].append(forward_logits(*args))
        return seen[-1][-1]

    monkeypatch.setattr(stages, "frozen_hidden", recording_hidden)
    monkeypatch.setattr(stages, "koopman_forward_logits", recording_logits)
    run = run_tiny(tmp_path / "run")
    idx, expected = next(entry for entry in seen if len(entry) == 2)  # linearity's batches have no logits

    model = stagewise.load_model(run)
    term = stagewise_koopman.load_term(run)  # the README's snippet
    with torch.no_grad():
        hidden = model(idx, return_hidden=True)["hidden"]
        logits = stagewise_koopman.koopman_forward_logits(model, term, hidden, replace=2)
    assert torch.equal(logits, expected)
    assert not term.training and next(term.parameters()).device.type == "cpu"


def test_a_missing_term_names_the_terms_the_checkpoint_has(tiny_run):
    with pytest.raises(stagewise.CheckpointError, match=r"last\.pt: .*named 'kopman' \(found: koopman\)"):
        stagewise_koopman.load_term(tiny_run, "kopman")
    with pytest.raises(stagewise.CheckpointError, match=r"warmup\.pt: .*named 'koopman' \(found: none\)"):
        stagewise_koopman.load_term(tiny_run / "checkpoints" / "warmup.pt")


def test_an_export_holds_the_terms_phi_k_psi_as_the_checkpoint_does(tiny_run, tmp_path):
    # was: stagewise export wrote the model alone, so a numpy-only user had no Koopman term
    from stagewise.engine.checkpoint import load_checkpoint
    from stagewise.export import export_npz

    export_npz(tiny_run / "checkpoints" / "last.pt", tmp_path / "m.npz")
    saved = load_checkpoint(tiny_run / "checkpoints" / "last.pt")["artifacts"]["koopman.operators"]["koopman"]
    with np.load(tmp_path / "m.npz", allow_pickle=False) as f:  # numpy alone, as the README reads it
        state = {key: f[f"artifacts/koopman.operators/koopman/state/{key}"] for key in saved["state"]}
        meta = json.loads(str(f["__meta__"]))["artifacts"]["koopman.operators"]["koopman"]
    assert all(np.array_equal(state[key], tensor.numpy()) for key, tensor in saved["state"].items())
    assert meta == {**{k: v for k, v in saved.items() if k != "state"}, "state": {}}

    # the README's numpy forward map ψ(K² φ(h)) is the term's
    i, h = meta["sources"].index(1), torch.randn(5, meta["width"], generator=torch.Generator().manual_seed(0))
    h_hat = h.numpy() / np.sqrt((h.numpy() ** 2).mean(-1, keepdims=True) + 1e-6)
    z = np.tanh(h_hat @ state["lift_weight"][i] + state["lift_bias"][i])
    estimate = z @ state["operator"][i].T @ state["operator"][i].T @ state["decode_weight"][i] + state["decode_bias"][i]
    term, j = stagewise_koopman.load_term(tiny_run), slice(i, i + 1)
    with torch.no_grad():
        expected = term.koopman.decode(term.koopman.advance(term.koopman.lift(h[None], j), 2, j), j)[0]
    np.testing.assert_allclose(estimate, expected.numpy(), rtol=1e-5, atol=1e-5)
