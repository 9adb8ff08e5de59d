"""The benchmark script's bookkeeping: no benchmark-sized run here."""

from __future__ import annotations


def test_bad_data_is_a_message_not_a_traceback(bench, tmp_path, capsys):
    assert bench.main(["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "out"), "--quick"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ashem_vs_baseline: ") and "missing does not exist" in err
    assert "Traceback" not in err

