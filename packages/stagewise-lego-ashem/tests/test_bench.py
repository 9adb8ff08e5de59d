"""The benchmark script's bookkeeping: no benchmark-sized run here."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "bench" / "ashem_vs_baseline.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("ashem_vs_baseline", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bad_data_is_a_message_not_a_traceback(bench, tmp_path, capsys):
    assert bench.main(["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "out"), "--quick"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ashem_vs_baseline: ") and "missing does not exist" in err
    assert "Traceback" not in err

