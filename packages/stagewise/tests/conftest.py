"""Shared fixtures: tiny recipes that train in well under a second on 2 CPU cores."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from stagewise.recipe import load_recipe

# Core's tests see core alone, whatever else is installed: load no third-party entry point
# (the name matches none; core's built-ins always load). Child processes inherit this.
os.environ["STAGEWISE_LOAD_PLUGINS"] = "stagewise"


@pytest.fixture(autouse=True, scope="session")
def _token_cache_in_temp(tmp_path_factory):
    """Cached token ids go to the session's temp folder (child processes too), never to ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("STAGEWISE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield

TINY = """
[run]
name = "tiny"
device = "cpu"  # the golden records are CPU records; CUDA is tested separately
seed = 7
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
n_layer = 2
n_embd = 16
n_head = 2
ffn_hidden = 32

[[stages]]
name = "phase1"
use = "stagewise.train"
lr = 1e-2
max_epochs = 2
max_steps_per_epoch = 5
grad_clip = 1.0

[[stages]]
name = "phase2"
use = "stagewise.train"
grow = { n_layer = 3 }
train = ["layers.2.*"]
lr = 1e-2
max_epochs = 2
max_steps_per_epoch = 5

[[stages]]
name = "test"
use = "stagewise.evaluate"
split = "test"
"""


# A classifier on a CSV file c.csv beside the recipe (columns x..., y).
CLASSES = """
[data]
use = "stagewise.csv"
path = "c.csv"
target = ["y"]
splits = { train = 0.5, valid = 0.5 }

[model]
use = "stagewise.mlp"
hidden = [4]

[[stages]]
name = "s"
max_epochs = 1
"""


@pytest.fixture
def tiny_recipe_path(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


@pytest.fixture
def tiny(tiny_recipe_path: Path):
    """A loader of the tiny recipe with ``--set`` style overrides."""
    return lambda *overrides: load_recipe(tiny_recipe_path, list(overrides))


def read_summary(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def read_records(run_dir: Path, event: str | None = None) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return [r for r in records if event is None or r["event"] == event]


class RunsCode:
    """Pickles as a call of os.system: loading it unsafely (pickle, torch.load without weights_only)
    would run ``touch marker``; tests check that the marker never appears."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))
