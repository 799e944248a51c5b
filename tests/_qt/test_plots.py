"""The live training plots: points, smoothing, throttled redraws and PNG export."""

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
    assert list(plots._raw_line.get_ydata()) == [1.0, 0.0, 0.0]
    assert [line.get_label() for line in plots._dice_lines] == ["membrane", "cell"]
    assert list(plots._dice_lines[1].get_ydata()) == [0.75]
    assert plots.loss_axes.get_xlabel() == "step" and plots.dice_axes.get_ylabel() == "Dice"


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
    assert plots._raw_line.get_xdata()[-1] == 1999


def test_growing_curves_are_blitted_and_the_axes_redrawn_only_when_limits_double(plots, qtbot):
    plots.add_step(0, 1.0)
    plots.redraw()
    qtbot.waitUntil(lambda: plots.full_draws >= 1, timeout=2000)
    qtbot.wait(50)
    before = plots.full_draws
    for step in range(1, 640):
        plots.add_step(step, 0.5)
        if step % 10 == 0:
            plots.redraw()
            qtbot.wait(1)
    qtbot.wait(100)
    # x limits 10 -> 40 -> 100 -> 220 -> 460 -> 940: 5 full draws for 64 redraws, the rest were blits
    assert plots.full_draws - before <= 6
    assert plots.loss_axes.get_xlim() == (0.0, 940.0)
    assert plots.loss_axes.get_ylim()[1] >= 1.0  # the first, largest loss stays in view


def test_export_png_and_clear(plots, tmp_path):
    plots.add_step(0, 0.7)
    plots.add_validation(0, [0.3, 0.4])
    path = plots.export_png(tmp_path / "out" / "plots")
    assert path.name == "plots.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    plots.clear()
    assert plots.n_loss_points == 0 and plots.n_dice_points == 0 and plots._dice_lines == []
