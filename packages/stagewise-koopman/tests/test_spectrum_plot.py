"""plots/koopman_spectrum.png: the eigenvalue moduli of each K against |λ| = 1."""

from __future__ import annotations

from conftest import run_tiny
from stagewise_koopman import forward_mode, stages
from stagewise_koopman.loss import KoopmanOperator, KoopmanOptions


def test_the_unit_circle_is_a_reference_line_not_a_data_series(tmp_path, monkeypatch):
    # was: "|λ| = 1" was a series of its own, with markers and a legend entry like each K
    drawn = []
    monkeypatch.setattr(forward_mode, "line_plot", lambda path, series, **kw: drawn.append((series, kw)))
    term = KoopmanOperator(KoopmanOptions(koopman_dim=4, steps=1, layers=[0, 1])).build(n_hidden=3, width=8)
    forward_mode.plot_spectrum(tmp_path / "spectrum.png", term, "spectrum")
    series, kw = drawn[0]
    assert list(series) == ["K0", "K1"]
    assert kw["hlines"] == [(1.0, "|λ| = 1")]


def test_the_spectrum_plot_is_titled_with_the_run_s_name(tmp_path, monkeypatch):
    # as core's curves.png: plots of several runs side by side say which run each is
    titles = []
    monkeypatch.setattr(stages, "plot_spectrum", lambda path, term, title: titles.append((path.name, title)))
    run_tiny(tmp_path / "run")
    assert titles == [("koopman_spectrum.png", "tiny_hybrid: spectrum of each K (koopman)")]
