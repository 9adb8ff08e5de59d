"""Shared fixtures: a tiny hybrid recipe (3 blocks, width 16) that runs in about a second."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stagewise.engine.runner import run_recipe
from stagewise.recipe import recipe_from_table

# This package's tests see core and this plugin only, whatever else is installed.
os.environ["STAGEWISE_LOAD_PLUGINS"] = "koopman"

TINY_HYBRID = """
[run]
name = "tiny_hybrid"
device = "cpu"  # the golden records are CPU records; CUDA is tested separately
seed = 5
threads = 1
log_every_n_steps = 1

[data]
use = "stagewise.text"
seq_len = 8
batch_size = 4
max_tokens = 400
max_vocab = 200

[model]
use = "stagewise.transformer"
n_layer = 3
n_embd = 16
n_head = 2
ffn_hidden = 32

[[stages]]
name = "warmup"
use = "stagewise.train"
lr = 1e-2
max_epochs = 1
max_steps_per_epoch = 3

[[stages]]
name = "main"
use = "stagewise.train"
lr = 1e-2
max_epochs = 3
max_steps_per_epoch = 3

[[stages.losses]]
use = "stagewise.cross_entropy"

[[stages.losses]]
use = "koopman.operator"
name = "koopman"
weight = 0.5
start_epoch = 1
ramp_epochs = 2
fallback_threshold = 3.1
fallback_factor = 0.1
koopman_dim = 8
steps = 2
spectral_weight = 0.1
dmd_every = 2
dmd_buffer = 16

[[stages]]
name = "forward"
use = "koopman.forward_eval"
replace_layers = 2

[[stages]]
name = "linearity"
use = "koopman.linearity"
fit = { koopman_dim = 8, steps = 2 }
fit_steps = 5

[[stages]]
name = "test"
use = "stagewise.evaluate"
split = "test"
"""
TRAIN_ONLY = TINY_HYBRID[: TINY_HYBRID.index('[[stages]]\nname = "forward"')]  # warmup and main


def tiny_recipe(text: str = TINY_HYBRID, overrides: list[str] | None = None):
    import tomllib

    return recipe_from_table(tomllib.loads(text), "tiny_hybrid.toml", overrides or [])


def run_tiny(out: Path, text: str = TINY_HYBRID, overrides: list[str] | None = None, quiet: bool = True) -> Path:
    return run_recipe(tiny_recipe(text, overrides), out=out, quiet=quiet)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished run of TINY_HYBRID, shared by the tests that only read it."""
    return run_tiny(tmp_path_factory.mktemp("runs") / "tiny")
