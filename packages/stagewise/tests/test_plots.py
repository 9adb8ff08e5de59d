"""Built-in event plugins: loss curves (extra [plots]) and TensorBoard scalars (extra [tensorboard])."""

from __future__ import annotations

import pytest

from stagewise.engine.runner import run_recipe
from stagewise.plots import line_plot


def test_run_draws_loss_curves(tiny, tmp_path):
    pytest.importorskip("matplotlib")
    run_dir = run_recipe(tiny(), out=tmp_path / "run", quiet=True)
    png = run_dir / "plots" / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_line_plot_without_matplotlib_hints_once(monkeypatch, tmp_path, capsys):
    import stagewise.plots as plots

    monkeypatch.setattr(plots, "have_matplotlib", lambda: False)
    monkeypatch.setattr(plots, "_hinted", False)
    assert line_plot(tmp_path / "x.png", {"a": ([1], [1])}) is False
    assert line_plot(tmp_path / "x.png", {"a": ([1], [1])}) is False
    assert capsys.readouterr().err.count("pip install 'stagewise[plots]'") == 1
    assert not (tmp_path / "x.png").exists()


def test_tensorboard_scalars(tiny, tmp_path):
    pytest.importorskip("tensorboard")
    run_dir = run_recipe(tiny("run.tensorboard=true"), out=tmp_path / "run", quiet=True)
    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
