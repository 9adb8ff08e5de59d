"""Built-in event plugins: loss curves (extra [plots]) and TensorBoard scalars (extra [tensorboard])."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from stagewise import install
from stagewise.engine.runner import run_recipe
from stagewise.plots import line_plot


def test_run_draws_loss_curves(tiny, tmp_path):
    pytest.importorskip("matplotlib")
    run_dir = run_recipe(tiny(), out=tmp_path / "run", quiet=True)
    png = run_dir / "plots" / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_line_plot_keeps_the_axis_labels_of_wide_tick_labels_in_the_picture(tmp_path):
    # was: lego_ashem's accuracy_compute.png (accuracies such as 0.0921 on the y axis) lost the
    # left half of its "accuracy" label past the image's edge
    image = pytest.importorskip("matplotlib.image")
    path = tmp_path / "p.png"
    line_plot(path, {"a": ([0.66, 0.8, 1.2], [0.0915, 0.0921, 0.0915])}, xlabel="cost", ylabel="accuracy")
    pixels = image.imread(path)[:, :, :3]
    for edge in (pixels[:, 0], pixels[:, -1], pixels[0], pixels[-1]):
        assert edge.min() == 1.0  # white: nothing drawn reaches the image's border


def test_line_plot_without_matplotlib_hints_once(monkeypatch, tmp_path, capsys):
    import stagewise.plots as plots

    monkeypatch.setattr(plots, "have_matplotlib", lambda: False)
    monkeypatch.setattr(plots, "_hinted", set())
    monkeypatch.setattr(install, "CHECKOUT_PACKAGES", tmp_path)  # core from the package index
    assert line_plot(tmp_path / "x.png", {"a": ([1], [1])}) is False
    assert line_plot(tmp_path / "x.png", {"a": ([1], [1])}) is False
    assert capsys.readouterr().err.count("pip install 'stagewise[plots]'") == 1
    assert not (tmp_path / "x.png").exists()
    assert line_plot(tmp_path / "plots" / "x.png", {"a": ([1], [1])}) is False
    assert not (tmp_path / "plots").exists()  # a run without matplotlib had an empty plots/


def test_a_run_without_matplotlib_says_once_why_it_has_no_curves(tiny, tmp_path, monkeypatch, capsys):
    # was: curves.png was skipped without a word (the curves plugin never reached line_plot's hint)
    import importlib.util

    import stagewise.plots as plots

    find_spec = importlib.util.find_spec  # matplotlib is not installed, as far as any module can tell
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else find_spec(name, *a))
    monkeypatch.setattr(plots, "_hinted", set())
    monkeypatch.setattr(install, "CHECKOUT_PACKAGES", tmp_path)  # core from the package index
    for name in ("a", "b"):  # each run says it, once
        run_dir = run_recipe(tiny(), out=tmp_path / name, quiet=True)
        err = capsys.readouterr().err
        assert err.count("stagewise: hint:") == 1
        assert (f"stagewise: hint: matplotlib is not installed, so {run_dir / 'plots' / 'curves.png'} (and this "
                f"run's other plots) is not drawn; pip install 'stagewise[plots]' to get them\n") in err
        assert not (run_dir / "plots").exists()


def test_tensorboard_scalars(tiny, tmp_path):
    pytest.importorskip("tensorboard")
    run_dir = run_recipe(tiny("run.tensorboard=true"), out=tmp_path / "run", quiet=True)
    events = sorted((run_dir / "tensorboard").rglob("events.out.tfevents.*"))  # was: one file in tensorboard/
    assert [path.parent.relative_to(run_dir / "tensorboard").as_posix() for path in events] == \
        ["phase1/epochs", "phase1/steps", "phase2/epochs", "phase2/steps"]  # the evaluate stage logs none
    assert all(path.stat().st_size > 0 for path in events)


def _finished_run(tmp_path, records):
    """What the curves plugin reads after a run: the recipe's name and RUN_DIR/metrics.jsonl."""
    import json
    from types import SimpleNamespace

    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    run_dir = SimpleNamespace(path=tmp_path, plot_path=lambda name: tmp_path / name)
    return SimpleNamespace(run_dir=run_dir, recipe=SimpleNamespace(run=SimpleNamespace(name="r")))


def test_curves_number_epochs_across_stages_and_mark_each_stage_start(tmp_path, monkeypatch):
    from stagewise.builtins import curves

    pytest.importorskip("matplotlib")
    drawn = []
    monkeypatch.setattr(curves, "line_plot", lambda path, series, **kw: drawn.append((path, series, kw)))
    state = _finished_run(tmp_path, [
        {"event": "step", "stage": "a", "train/loss": 9.0},  # only epoch records are plotted
        {"event": "epoch", "stage": "a", "train/loss": 3.0, "val/loss": 3.5},
        {"event": "epoch", "stage": "a", "train/loss": 2.0, "val/loss": 2.5},
        {"event": "epoch", "stage": "b", "train/loss": 1.0},  # a stage without validation
        {"event": "stage", "stage": "b"},
    ])
    curves.stagewise_after_run(state)
    ((path, series, kw),) = drawn
    assert path == tmp_path / "curves.png"
    # a None y between two stages' points breaks the line there
    assert series == {"train/loss": ([1, 2, 2.5, 3], [3.0, 2.0, None, 1.0]), "val/loss": ([1, 2], [3.5, 2.5])}
    assert kw["vlines"] == [(0.5, "a"), (2.5, "b")]  # just before each stage's first epoch


def test_curves_leave_out_missing_series_and_runs_without_epochs(tmp_path, monkeypatch):
    from stagewise.builtins import curves

    pytest.importorskip("matplotlib")
    drawn = []
    monkeypatch.setattr(curves, "line_plot", lambda path, series, **kw: drawn.append(series))
    curves.stagewise_after_run(_finished_run(tmp_path, [{"event": "epoch", "stage": "a", "train/loss": 1.0}]))
    assert drawn == [{"train/loss": ([1], [1.0])}]  # no empty val/loss line in the legend
    drawn.clear()
    curves.stagewise_after_run(_finished_run(tmp_path, [{"event": "stage", "stage": "eval"}]))
    assert drawn == []  # an evaluation-only run has no curve to draw


def test_curves_read_a_long_runs_metrics_a_line_at_a_time(tmp_path, monkeypatch):
    # was: the whole metrics.jsonl was read into memory (text and its lines) once the run ended,
    # with log_every_n_steps = 1 as large as the run was long
    import tracemalloc

    from stagewise.builtins import curves

    drawn = []
    monkeypatch.setattr(curves, "line_plot", lambda path, series, **kw: drawn.append(series))
    steps = [{"event": "step", "stage": "a", "epoch": 0, "step": i, "train/loss": 1.0, "train/lr": 0.001}
             for i in range(40_000)]
    state = _finished_run(tmp_path, [*steps, {"event": "epoch", "stage": "a", "train/loss": 1.0}])
    assert (tmp_path / "metrics.jsonl").stat().st_size > 3_000_000
    tracemalloc.start()
    try:
        curves.stagewise_after_run(state)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert drawn == [{"train/loss": ([1], [1.0])}]
    assert peak < 500_000  # what one line and the epoch records take, not the file's 3 MB


class FakeWriter:
    def __init__(self):
        self.scalars, self.closed = [], False

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):  # the points are in self.scalars already
        pass

    def close(self):
        self.closed = True


def _tensorboard_state(tmp_path, log_every=1):
    from types import SimpleNamespace

    from stagewise.engine.rundir import RunDir

    run = SimpleNamespace(tensorboard=True, log_every_n_steps=log_every)
    recipe = SimpleNamespace(run=run, stages=[SimpleNamespace(checkpoint="phase1")])
    return SimpleNamespace(recipe=recipe, run_dir=RunDir(tmp_path), stage_name="phase1", stage_index=0, step=0,
                           epoch=0)


def test_tensorboard_logs_every_nth_step_and_numeric_epoch_metrics(tmp_path, monkeypatch):
    import sys
    from types import SimpleNamespace

    from stagewise.builtins import tensorboard

    state, writer, opened = _tensorboard_state(tmp_path, log_every=2), FakeWriter(), []

    def open_writer(folder, purge_step):  # the one fake writer stands for each folder's
        opened.append((folder, purge_step))
        return writer

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", SimpleNamespace(SummaryWriter=open_writer))
    for step in (1, 2, 3, 4):
        state.step = step
        tensorboard.stagewise_after_step(state, loss=float(step))
    state.epoch = 1
    tensorboard.stagewise_after_epoch(state, {"val/loss": 0.5, "stopped": True, "note": "x", "n": 3})
    assert writer.scalars == [("phase1/train/loss_step", 2.0, 2), ("phase1/train/loss_step", 4.0, 4),
                              ("phase1/val/loss", 0.5, 1), ("phase1/n", 3, 1)]  # no booleans, no text
    # a folder per stage and series, opened at its first point: a resumed run's hides a killed run's from there on
    assert opened == [(str(tmp_path / "tensorboard" / "phase1" / "steps"), 2),
                      (str(tmp_path / "tensorboard" / "phase1" / "epochs"), 1)]
    state.run_dir.close()  # as the engine does when the run ends, finished or failed
    assert writer.closed and id(state) not in tensorboard._writers  # a later run with this id gets a new writer


def test_a_finished_stage_closes_its_tensorboard_writers(tmp_path, monkeypatch):
    import sys
    from types import SimpleNamespace

    from stagewise.builtins import tensorboard

    state, writer = _tensorboard_state(tmp_path), FakeWriter()
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard",
                        SimpleNamespace(SummaryWriter=lambda folder, purge_step: writer))
    state.step = 1
    tensorboard.stagewise_after_step(state, loss=1.0)
    tensorboard.stagewise_after_stage(state)  # its points are on disk; a long recipe keeps no idle writers open
    assert writer.closed and tensorboard._writers[id(state)] == {}
    state.run_dir.close()


def test_a_failed_run_closes_its_tensorboard_writer(tiny, tmp_path):
    pytest.importorskip("tensorboard")
    import stagewise
    from stagewise.builtins import tensorboard
    from stagewise.plugins import register_plugin, unregister_plugin

    class Fails:
        @stagewise.hookimpl
        def stagewise_after_step(self, state):
            if state.step == 2:
                raise RuntimeError("boom")

    register_plugin(Fails(), "fails")
    try:
        with pytest.raises(RuntimeError, match="boom"):
            run_recipe(tiny("run.tensorboard=true"), out=tmp_path / "run", quiet=True)
    finally:
        unregister_plugin("fails")
    assert tensorboard._writers == {}  # was left open: a later state with the same id wrote to this run's folder


def test_tensorboard_missing_fails_before_the_first_step(tmp_path, monkeypatch):
    import sys

    from stagewise.builtins import tensorboard
    from stagewise.errors import ConfigError

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    monkeypatch.setattr(install, "CHECKOUT_PACKAGES", tmp_path)  # core from the package index
    with pytest.raises(ConfigError, match=r"pip install 'stagewise\[tensorboard\]' or set tensorboard = false"):
        tensorboard.stagewise_before_run(_tensorboard_state(tmp_path))


def test_line_plot_draws_hlines_as_reference_lines_outside_the_legend(tmp_path, monkeypatch):
    figure = pytest.importorskip("matplotlib.figure")
    drawn = []
    monkeypatch.setattr(figure.Figure, "savefig", lambda fig, *args, **kw: drawn.append(fig))
    line_plot(tmp_path / "p.png", {"K0": ([1, 2], [1.2, 0.5])}, hlines=[(1.0, "|λ| = 1")])
    ax = drawn[0].axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["K0"]
    reference = [line for line in ax.get_lines() if list(line.get_ydata()) == [1.0, 1.0]]
    assert len(reference) == 1 and reference[0].get_marker() in ("None", "", None)
    assert "|λ| = 1" in [t.get_text().strip() for t in ax.texts]


def test_a_plot_stopped_mid_write_keeps_the_earlier_picture_and_leaves_no_temp_file(tmp_path, monkeypatch):
    # was: savefig wrote straight into the PNG, so a run killed while drawing left a cut picture
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    path = tmp_path / "plots" / "curves.png"
    line_plot(path, {"a": ([1, 2], [1, 2])})
    drawn = path.read_bytes()

    def stopped(self, target, **kwargs):
        target.write(drawn[:100]) if hasattr(target, "write") else Path(target).write_bytes(drawn[:100])
        raise KeyboardInterrupt  # Ctrl-C in the middle of the write

    monkeypatch.setattr(Figure, "savefig", stopped)
    with pytest.raises(KeyboardInterrupt):
        line_plot(path, {"a": ([1, 2], [2, 1])})
    assert path.read_bytes() == drawn and [p.name for p in path.parent.iterdir()] == ["curves.png"]


def _drawn_axes(monkeypatch, *args, **kwargs):
    """The axes line_plot(*args, **kwargs) draws, laid out by Agg as in the PNG, without writing it."""
    drawn = _figures(monkeypatch)
    assert line_plot(*args, **kwargs) is True
    return _laid_out(drawn[0])


def _figures(monkeypatch):
    """The figures line_plot draws from now on, in order; none is written."""
    figure = pytest.importorskip("matplotlib.figure")
    drawn = []
    monkeypatch.setattr(figure.Figure, "savefig", lambda fig, *a, **kw: drawn.append(fig))
    return drawn


def _laid_out(fig):
    """The figure's axes, laid out by Agg as in the PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).draw()
    return fig.axes[0]


def _data_lines(ax):
    """The axes' series by legend name (not the stage or reference lines)."""
    return {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}


def _pieces(line):
    """How many separate strokes a line is drawn in: a NaN y breaks it."""
    from matplotlib.path import Path as MplPath

    return list(line.get_path().cleaned(remove_nans=True).codes).count(MplPath.MOVETO)


def test_curves_plot_a_non_finite_epoch_metric_as_a_gap_on_a_numeric_axis(tmp_path, monkeypatch):
    # was: metrics.jsonl writes NaN/Inf as "nan"/"inf" strings, which curves.png plotted as categories:
    # a y axis ticked "5.0", "nan", "4.0" in the order met, and no loss value on it
    from stagewise.builtins import curves

    drawn = []
    monkeypatch.setattr(curves, "line_plot", lambda path, series, **kw: drawn.append(series))
    curves.stagewise_after_run(_finished_run(tmp_path, [
        {"event": "epoch", "stage": "a", "train/loss": 5.0, "val/loss": 5.5},
        {"event": "epoch", "stage": "a", "train/loss": 4.0, "val/loss": "nan"},
        {"event": "epoch", "stage": "a", "train/loss": 3.0, "val/loss": "inf"},
    ]))
    ys = drawn[0]["val/loss"][1]
    assert ys[0] == 5.5 and math.isnan(ys[1]) and ys[2] == math.inf


def test_a_run_whose_epochs_record_accuracy_draws_it_beside_the_losses(tmp_path, monkeypatch):
    # was: a classifier's val/acc was in metrics.jsonl only; a run without accuracy gets no accuracy.png
    from stagewise.builtins import curves

    drawn = {}
    monkeypatch.setattr(curves, "line_plot", lambda path, series, **kw: drawn.update({path.name: (series, kw)}))
    curves.stagewise_after_run(_finished_run(tmp_path, [
        {"event": "epoch", "stage": "a", "train/loss": 5.0, "val/loss": 5.5, "val/acc": 0.25},
        {"event": "epoch", "stage": "b", "train/loss": 4.0, "val/loss": 4.5, "val/acc": 0.5}]))
    series, options = drawn["accuracy.png"]
    assert series == {"val/acc": ([1, 1.5, 2], [0.25, None, 0.5])}  # broken at the stage start, as the losses
    assert options["ylabel"] == "accuracy" and options["logy"] is False
    assert options["vlines"] == drawn["curves.png"][1]["vlines"] == [(0.5, "a"), (1.5, "b")]
    drawn.clear()
    curves.stagewise_after_run(_finished_run(tmp_path, [{"event": "epoch", "stage": "a", "train/loss": 5.0}]))
    assert list(drawn) == ["curves.png"]


def test_line_plot_says_in_the_legend_how_many_points_are_not_finite(tmp_path, monkeypatch):
    # was: a NaN or Inf point was left out without a word; an all-NaN val/loss had a legend entry and no line
    ax = _drawn_axes(monkeypatch, tmp_path / "p.png", {"train/loss": ([1, 2, 3], [5.0, 4.0, 3.0]),
                                                      "val/loss": ([1, 2, 3], [5.5, math.nan, math.inf])})
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train/loss", "val/loss (2 not finite, not drawn)"]


def test_one_epoch_s_curve_ticks_whole_epochs_only(tmp_path, monkeypatch):
    # was: a single epoch (x = 1, its stage marked at 0.5) was ticked 0.48, 0.54, ..., 1.02
    ax = _drawn_axes(monkeypatch, tmp_path / "p.png", {"train/loss": ([1], [5.0])}, vlines=[(0.5, "only")])
    lo, hi = ax.get_xlim()
    assert [t for t in ax.get_xticks() if lo <= t <= hi] == [1.0]


def test_a_fractional_x_axis_keeps_fractional_ticks(tmp_path, monkeypatch):
    # lego_ashem's accuracy against compute_cost_flops (0.75 to 1.5): whole-number ticks would leave only 1
    ax = _drawn_axes(monkeypatch, tmp_path / "p.png", {"acc": ([0.75, 1.1, 1.5], [0.26, 0.258, 0.255])})
    lo, hi = ax.get_xlim()
    assert len([t for t in ax.get_xticks() if lo <= t <= hi]) >= 4


def test_stage_labels_of_short_stages_do_not_overlap(tmp_path, monkeypatch):
    # was: each stage's name was written horizontally at the top of the axes, so stages one epoch long
    # (or long names) printed on top of each other, unreadable
    stages = [(i + 0.5, f"stage_number_{i}_with_a_long_name") for i in range(8)]
    ax = _drawn_axes(monkeypatch, tmp_path / "p.png", {"train/loss": (list(range(1, 34)), [1.0] * 33)},
                     vlines=stages)
    renderer = ax.figure.canvas.get_renderer()
    names = sorted(name for _, name in stages)
    labels = [t for t in ax.figure.findobj(lambda a: hasattr(a, "get_text") and a.get_text().strip() in names)
              if t.get_visible()]
    assert sorted(t.get_text().strip() for t in labels) == names
    boxes = [t.get_window_extent(renderer) for t in labels]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    data = ax.get_window_extent(renderer)
    assert all(box.y0 >= data.y1 - 1 for box in boxes)  # above the data, clear of curves and legend


def test_a_plot_that_cannot_be_drawn_warns_and_leaves_the_run_its_results(tiny, tmp_path, monkeypatch, capsys):
    # was: a broken matplotlib (installed, but failing to import, e.g. built for another numpy) or a bad
    # MPLBACKEND raised from the curves hook after every stage had finished: exit 1, no summary.json
    pytest.importorskip("matplotlib")
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import matplotlib.figure raises ImportError
    run_dir = run_recipe(tiny(), out=tmp_path / "run", quiet=True)
    assert (run_dir / "summary.json").is_file() and not (run_dir / "plots").exists()
    err = capsys.readouterr().err
    assert f"stagewise: warning: {run_dir / 'plots' / 'curves.png'} is not drawn (ModuleNotFoundError: " in err


def test_curves_break_each_line_at_a_stage_start(tmp_path, monkeypatch):
    # was: stage a's last epoch was joined to stage b's first, though they are different models (or objectives)
    from stagewise.builtins import curves

    drawn = _figures(monkeypatch)
    curves.stagewise_after_run(_finished_run(tmp_path, [
        {"event": "epoch", "stage": "a", "train/loss": 3.0, "val/loss": 3.5},
        {"event": "epoch", "stage": "a", "train/loss": 2.0, "val/loss": 2.5},
        {"event": "epoch", "stage": "b", "train/loss": 2.6, "val/loss": 2.4},
        {"event": "epoch", "stage": "b", "train/loss": 1.0, "val/loss": 2.0},
        {"event": "epoch", "stage": "c", "train/loss": 0.9},  # no validation: val/loss's line just ends
    ]))
    ax = _laid_out(drawn[0])
    lines = _data_lines(ax)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train/loss", "val/loss"]  # no break counted
    assert {name: _pieces(line) for name, line in lines.items()} == {"train/loss": 3, "val/loss": 2}
    assert list(lines["train/loss"].get_xdata()) == [1, 2, 2.5, 3, 4, 4.5, 5]  # the breaks at the stage starts
    lo, hi = ax.get_xlim()
    assert all(float(t).is_integer() for t in ax.get_xticks() if lo <= t <= hi)  # still whole epochs only


def test_line_plot_draws_a_log_y_axis_only_when_asked(tmp_path, monkeypatch):
    series = {"train/loss": ([1, 2, 3], [8.0, 0.5, 0.01])}
    assert _drawn_axes(monkeypatch, tmp_path / "p.png", series).get_yscale() == "linear"
    ax = _drawn_axes(monkeypatch, tmp_path / "p.png", series, logy=True)
    assert ax.get_yscale() == "log"
    lo, hi = ax.get_ylim()
    assert lo < 0.01 and hi > 8.0


@pytest.mark.parametrize("ys, log", [
    ([8.0, 2.0, 0.5, 0.05, 0.01], True),  # was: every epoch after the second lay flat on the bottom
    ([5.3, 5.0, 4.6], False),  # a language model's loss: the usual linear axis reads well
    ([15.0, 1.5], True), ([10.0, 1.0], True), ([9.9, 1.0], False),  # a factor of 10 or more
    ([8.0, 0.0], False), ([1.0, -0.1], False),  # a log axis cannot hold 0 or below
    ([8.0, math.nan, math.inf, 4.0], False),  # NaN and Inf are not drawn, so they do not count
    ([math.nan], False),
])
def test_curves_take_a_log_axis_when_the_losses_span_a_factor_of_10(tmp_path, monkeypatch, ys, log):
    from stagewise.builtins import curves

    drawn = []
    monkeypatch.setattr(curves, "line_plot", lambda path, series, **kw: drawn.append(kw))
    curves.stagewise_after_run(_finished_run(tmp_path, [{"event": "epoch", "stage": "a", "train/loss": y}
                                                        for y in ys]))
    assert drawn[0]["logy"] is log


@pytest.mark.parametrize("ys, labels", [
    # was: just over a decade (2 down to 0.15) had a single power of ten in view, so one label, "10⁰"
    ([2.0, 0.8, 0.3, 0.15], ["0.2", "0.5", "1", "2"]),
    ([8.0, 1.0, 0.1, 0.01], ["0.01", "0.02", "0.05", "0.1", "0.2", "0.5", "1", "2", "5", "10"]),
    ([8.0, 1e-3, 1e-6], ["1e\u221206", "1e\u221205", "0.0001", "0.001", "0.01", "0.1", "1", "10"]),  # 10ⁿ only
])
def test_a_log_axis_labels_enough_ticks_to_read_a_value(tmp_path, monkeypatch, ys, labels):
    ax = _drawn_axes(monkeypatch, tmp_path / "p.png", {"val/loss": (list(range(1, len(ys) + 1)), ys)}, logy=True)
    lo, hi = ax.get_ylim()
    texts = [t for t in ax.yaxis.get_ticklabels() + ax.yaxis.get_ticklabels(minor=True)
             if t.get_text() and lo <= t.get_position()[1] <= hi]
    assert [t.get_text() for t in texts] == labels
    boxes = [t.get_window_extent(ax.figure.canvas.get_renderer()) for t in texts]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


# each compared run's epochs: the method's two stages (its val/loss diverges once), the baseline's one
_COMPARED = {"tiny": [("train", 6.0, 6.5), ("train", 4.0, 5.0), ("train", 3.0, 4.5)],
             "other": [("phase1", 6.0, 6.4), ("phase1", 4.0, math.nan), ("phase2", 2.0, 4.0)]}


def _compare(tiny_recipe_path, tmp_path, monkeypatch):
    """``compare_recipes`` of the tiny recipe and one named "other", with runs faked from ``_COMPARED``."""
    import json

    from stagewise.compare import compare_recipes
    from stagewise.engine.rundir import write_json_atomic

    def run(recipe, out, quiet=False, resume=None):
        out.mkdir(parents=True)
        epochs = _COMPARED[recipe.run.name]
        (out / "metrics.jsonl").write_text("".join(
            json.dumps({"event": "epoch", "stage": stage, "train/loss": train,
                        "val/loss": val if math.isfinite(val) else str(val)}) + "\n"  # as a run writes NaN
            for stage, train, val in epochs))
        write_json_atomic(out / "summary.json", {"metrics": {"val/loss": epochs[-1][2]}})
        return out

    monkeypatch.setattr("stagewise.engine.runner.run_recipe", run)
    other = tmp_path / "other.toml"
    other.write_text(tiny_recipe_path.read_text().replace('name = "tiny"', 'name = "other"'))
    compare_recipes([str(tiny_recipe_path), str(other)], [], tmp_path / "cmp", quiet=True)


def test_compare_draws_each_run_s_val_loss_and_says_where(tiny_recipe_path, tmp_path, monkeypatch, capsys):
    # was: a table only; how the runs got there (a method's second stage overtaking the baseline) was not to be seen
    import stagewise.compare

    pytest.importorskip("matplotlib")
    drawn = []

    def recorded(path, series, **kw):
        drawn.append((path, series, kw))
        return line_plot(path, series, **kw)

    monkeypatch.setattr(stagewise.compare, "line_plot", recorded)
    _compare(tiny_recipe_path, tmp_path, monkeypatch)
    out = tmp_path / "cmp"
    ((path, series, kw),) = drawn
    assert path == out / "compare.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(series) == ["tiny", "other"]  # a line (a colour) per run, named as in the table
    assert series["tiny"] == ([1, 2, 3], [6.5, 5.0, 4.5])
    xs, ys = series["other"]  # broken at its own stage start; the diverged epoch is a gap
    assert xs == [1, 2, 2.5, 3] and ys[0] == 6.4 and math.isnan(ys[1]) and ys[2:] == [None, 4.0]
    assert (kw["title"], kw["ylabel"], kw["logy"]) == ("tiny vs other: val/loss per epoch", "val/loss", False)
    assert capsys.readouterr().out.splitlines()[-3:] == ["", f"-> {out / 'compare.json'}", f"-> {out / 'compare.png'}"]


def test_compare_s_figure_gives_each_run_its_own_colour(tiny_recipe_path, tmp_path, monkeypatch):
    drawn = _figures(monkeypatch)
    _compare(tiny_recipe_path, tmp_path, monkeypatch)
    lines = _data_lines(_laid_out(drawn[0]))
    assert list(lines) == ["tiny", "other (1 not finite, not drawn)"]
    assert len({line.get_color() for line in lines.values()}) == 2


def test_compare_without_matplotlib_says_once_why_it_draws_no_figure(tiny_recipe_path, tmp_path, monkeypatch,
                                                                     capsys):
    import stagewise.plots as plots

    monkeypatch.setattr(plots, "have_matplotlib", lambda: False)
    monkeypatch.setattr(plots, "_hinted", set())
    monkeypatch.setattr(install, "CHECKOUT_PACKAGES", tmp_path)  # core from the package index
    _compare(tiny_recipe_path, tmp_path, monkeypatch)
    out = tmp_path / "cmp"
    captured = capsys.readouterr()
    assert captured.err == (f"stagewise: hint: matplotlib is not installed, so {out / 'compare.png'} (and this "
                            f"run's other plots) is not drawn; pip install 'stagewise[plots]' to get them\n")
    assert captured.out.splitlines()[-1] == f"-> {out / 'compare.json'}"  # no figure to point to
    assert sorted(p.name for p in out.iterdir()) == ["compare.json", "other", "tiny"]
