"""The live training plots: points, smoothing, throttled redraws, cheap updates and PNG export."""

from __future__ import annotations

import time

import numpy as np
import pytest

from napari_unet._qt.plots import TrainingPlots


@pytest.fixture
def plots(qtbot):
    widget = TrainingPlots(redraws_per_second=4)
    qtbot.addWidget(widget)
    widget.show()
    return widget


def test_points_reach_the_lines_with_a_smoothed_loss(plots):
    for step, loss in enumerate([1.0, 0.0, 0.0]):
        plots.add_step(step, loss)
    plots.set_class_names(["membrane", "cell"])
    plots.add_validation(2, [0.5, 0.75])
    plots.redraw()
    assert plots.n_loss_points == 3 and plots.n_dice_points == 1
    assert np.allclose(plots.smoothed, [1.0, 0.9, 0.81])
    assert list(plots.raw_curve.getData()[1]) == [1.0, 0.0, 0.0]
    assert [curve.name() for curve in plots.dice_curves] == ["membrane", "cell"]
    assert [label.text for _, label in plots.dice_legend.items] == ["membrane", "cell"]
    assert list(plots.dice_curves[1].getData()[1]) == [0.75]
    assert plots.loss_plot.getAxis("bottom").labelText == "step"
    assert plots.dice_plot.getAxis("left").labelText == "Dice"


def test_class_names_given_after_the_first_validation_rename_the_curves(plots):
    plots.add_validation(0, [0.5, 0.75])
    assert [curve.name() for curve in plots.dice_curves] == ["class 0", "class 1"]
    plots.set_class_names(["membrane", "cell"])
    assert [label.text for _, label in plots.dice_legend.items] == ["membrane", "cell"]


def test_many_points_are_cheap_and_redraws_are_throttled(plots, qtbot, monkeypatch):
    real_redraw = plots.redraw
    redraws = []
    monkeypatch.setattr(plots, "redraw", lambda: (redraws.append(time.perf_counter()), real_redraw()))
    started = time.perf_counter()
    for step in range(2000):
        plots.add_step(step, 1.0 / (step + 1))
        if step % 100 == 0:
            plots.add_validation(step, [0.1, 0.2])
    assert time.perf_counter() - started < 0.5  # appending never draws
    assert redraws == []
    qtbot.wait(1100)
    assert 1 <= len(redraws) <= 6  # at most ~4 redraws a second
    assert plots.raw_curve.getData()[0][-1] == 1999


def test_a_redraw_and_repaint_of_a_long_run_stays_well_under_50_ms(plots, qtbot):
    """The viewer must not stall: updating 20,000 loss points and repainting (new ticks) is cheap."""
    rng = np.random.default_rng(0)
    for step in range(20000):
        plots.add_step(step, float(rng.random()) / (1 + step / 1000))
        if step % 500 == 0:
            plots.add_validation(step, [0.5, 0.6])
    costs = []
    for _ in range(5):
        plots.add_step(plots.steps[-1] + 1, 0.1)
        started = time.perf_counter()
        plots.redraw()
        plots.graphics.viewport().repaint()  # paint now, as the event loop would
        costs.append(time.perf_counter() - started)
    # ~10 ms here; a matplotlib redraw with new ticks took 70-140 ms (the limit leaves room for a loaded CI)
    assert np.median(costs) < 0.1, costs
    low, high = plots.loss_plot.viewRange()[0]
    assert low <= 0 and high >= 20000  # the whole run in view
    assert plots.loss_plot.viewRange()[1][1] >= 0.9  # the first, largest losses stay in view


def test_export_png_and_clear(plots, tmp_path):
    plots.add_step(0, 0.7)
    plots.add_validation(0, [0.3, 0.4])
    path = plots.export_png(tmp_path / "out" / "plots")
    assert path.name == "plots.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    plots.clear()
    assert plots.n_loss_points == 0 and plots.n_dice_points == 0 and plots.dice_curves == []
    assert plots.dice_legend.items == []
