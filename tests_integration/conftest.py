"""Shared fixtures: the ``stagewise`` command in a subprocess, and tiny recipes that use the
example plugin (each trains in about a second on 2 CPU cores)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest


def _run_table(name: str) -> str:
    return f"""
[run]
name = "{name}"
device = "cpu"  # golden/example.json is a CPU record
seed = 3
threads = 1
log_every_n_steps = 1
"""


WARMUP = """
[data]
use = "stagewise.text"
seq_len = 8
batch_size = 4
max_tokens = 400
max_vocab = 200

[model]
use = "stagewise.transformer"
n_layer = 1
n_embd = 16
n_head = 2
ffn_hidden = 32

[[stages]]
name = "warmup"
use = "stagewise.train"
lr = 1e-2
max_epochs = 2
max_steps_per_epoch = 4
losses = [
  { use = "stagewise.cross_entropy" },
  { use = "example.entropy_bonus", weight = 0.1, start_epoch = 1 },
]
"""

HARD = """
[[stages]]
name = "mine"
use = "example.mine_hard"
router = { use = "example.loss_quantile", hard_ratio = 0.5 }

[[stages]]
name = "hard"
use = "example.train_hard"
lr = 1e-2
max_epochs = 2
max_steps_per_epoch = 2
"""

TEST = """
[[stages]]
name = "test"
use = "stagewise.evaluate"
split = "test"
"""

# The example plugin's stages, router and loss; BASELINE is the same run without mining.
EXAMPLE = _run_table("example") + WARMUP + HARD + TEST
BASELINE = _run_table("baseline") + WARMUP + TEST

Cli = Callable[..., subprocess.CompletedProcess]


def run_stagewise(*args: object, env: dict[str, str] | None = None, cwd: Path | None = None,
                  ok: bool = True) -> subprocess.CompletedProcess:
    """``python -m stagewise ARGS`` as a user runs it; ``ok`` asserts exit code 0."""
    result = subprocess.run([sys.executable, "-m", "stagewise", *map(str, args)], capture_output=True,
                            text=True, env=env, cwd=cwd, timeout=300)
    if ok:
        assert result.returncode == 0, f"stagewise {args} exited {result.returncode}:\n{result.stderr}"
    return result


@pytest.fixture(scope="session")
def cli() -> Cli:
    return run_stagewise


@pytest.fixture
def env_without_strict() -> dict[str, str]:
    """The environment without STAGEWISE_STRICT_PLUGINS (CI sets it), so broken plugins warn."""
    return {k: v for k, v in os.environ.items() if k != "STAGEWISE_STRICT_PLUGINS"}


@pytest.fixture(scope="session")
def recipes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("recipes")
    paths = {"example": folder / "example.toml", "baseline": folder / "baseline.toml"}
    paths["example"].write_text(EXAMPLE)
    paths["baseline"].write_text(BASELINE)
    return paths


@pytest.fixture(scope="session")
def example_run(recipes: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished CLI run of the EXAMPLE recipe, shared by the tests that only read it."""
    run_dir = tmp_path_factory.mktemp("runs") / "example"
    run_stagewise("run", recipes["example"], "--out", run_dir, "--quiet")
    return run_dir
