"""stagewise_koopman.load_term: a finished run's trained φ, K, ψ, for Koopman forward mode in Python."""

from __future__ import annotations

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
