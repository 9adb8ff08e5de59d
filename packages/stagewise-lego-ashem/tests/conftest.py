"""Tiny recipes that run the whole ASHEM pipeline in a second or two on 2 CPU cores."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from stagewise.recipe import load_recipe

# This package's tests see core and this plugin only, whatever else is installed.
os.environ["STAGEWISE_LOAD_PLUGINS"] = "stagewise,lego_ashem"

TINY = """
[run]
name = "tiny_ashem"
device = "cpu"  # the golden records are CPU records; CUDA is tested separately
seed = 3
threads = 1

[data]
use = "stagewise.text"
seq_len = 8
batch_size = 8
max_tokens = 1500
max_vocab = 300

[model]
use = "lego_ashem.deep_supervision_transformer"
n_layer = 2
n_embd = 16
n_head = 2
ffn_hidden = 32
exit_layer = 2

[[stages]]
name = "phase1"
use = "stagewise.train"
lr = 1e-2
grad_clip = 1.0
max_epochs = 2
max_steps_per_epoch = 8

[[stages]]
name = "mine"
use = "lego_ashem.mine"
router = { use = "lego_ashem.confidence", hard_ratio = 0.5 }
calib_split = "valid"
split = "train"

[[stages]]
name = "phase2"
use = "lego_ashem.train_upper_layers"
grow = { n_layer = 4 }
train = ["layers.2.*", "layers.3.*"]
lr = 1e-2
max_epochs = 2
max_steps_per_epoch = 8
measure_speed = false

[[stages]]
name = "test"
use = "lego_ashem.evaluate_routed"
split = "test"
measure_speed = false
curve_points = 3
"""


@pytest.fixture
def tiny(tmp_path: Path):
    """A loader of the tiny recipe with ``--set`` style overrides."""
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return lambda *overrides: load_recipe(path, list(overrides))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished run of the tiny recipe, shared by the tests that only read it."""
    from stagewise.engine.runner import run_recipe

    path = tmp_path_factory.mktemp("tiny") / "tiny.toml"
    path.write_text(TINY)
    return run_recipe(load_recipe(path), out=path.parent / "run", quiet=True)


def read_summary(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


@pytest.fixture(scope="module")
def bench():
    """bench/ashem_vs_baseline.py as a module: its bookkeeping and contract, tested without a benchmark-sized run."""
    spec = importlib.util.spec_from_file_location("ashem_vs_baseline", Path(__file__).parents[1] / "bench" /
                                                  "ashem_vs_baseline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
