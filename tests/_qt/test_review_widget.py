"""The Correct next widget in a real viewer: rank, uncertainty layer, go to next, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from napari.layers import Image

from napari_unet._qt.review_widget import ReviewWidget
from napari_unet._qt.shared import model_holder
from napari_unet.models import build_model


@pytest.fixture
def widget(viewer, qtbot):
    review = ReviewWidget(viewer)
    viewer.window.add_dock_widget(review, name="Correct next", area="right")
    return review


@pytest.fixture
def stack(viewer):
    image = np.random.default_rng(0).random((4, 32, 48)).astype(np.float32)
    return viewer.add_image(image, name="stack", scale=(2.0, 0.5, 0.5))


def tiny_model(spatial_dims: int = 2):
    torch.manual_seed(0)
    name = "unet" if spatial_dims == 2 else "unet3d"
    return build_model(name, width=4, depth=2).eval()


def wait_for(qtbot, widget, timeout=60_000):
    assert widget.worker is not None
    qtbot.waitUntil(lambda: widget.find_button.isEnabled(), timeout=timeout)


def test_find_rank_and_go_to_next(viewer, widget, stack, qtbot):
    model_holder(viewer).set(tiny_model(), source="test model", trained=True)
    widget.select_layer("stack")
    widget.run()
    wait_for(qtbot, widget)

    layer = viewer.layers["stack uncertainty"]
    assert isinstance(layer, Image)
    assert layer.data.shape == stack.data.shape
    assert tuple(layer.scale) == tuple(stack.scale)
    assert layer.blending == "additive"
    assert widget.list_widget.count() == 4
    assert widget.list_widget.item(0).text().startswith("slice ")
    assert "stack uncertainty" not in [widget.layer_combo.itemText(i) for i in range(widget.layer_combo.count())]

    worst = widget.queue.entries[0][0]
    second = widget.queue.entries[1][0]
    widget.go_to_next()
    assert viewer.dims.current_step[0] == worst
    widget.go_to_next()
    assert viewer.dims.current_step[0] == second
    assert widget.list_widget.currentRow() == 1

    widget.list_widget.setCurrentRow(3)  # a click on a row jumps there
    assert viewer.dims.current_step[0] == widget.queue.entries[3][0]

    # a rerun updates the same layer in place
    widget.run()
    wait_for(qtbot, widget)
    assert [lay.name for lay in viewer.layers].count("stack uncertainty") == 1


def test_3d_model_ranks_boxes(viewer, widget, qtbot):
    volume = np.random.default_rng(1).random((8, 32, 32)).astype(np.float32)
    viewer.add_image(volume, name="vol")
    model_holder(viewer).set(tiny_model(3), source="test 3d", trained=True)
    widget.select_layer("vol")
    widget.run()
    wait_for(qtbot, widget)
    assert viewer.layers["vol uncertainty"].data.shape == volume.shape
    assert widget.list_widget.count() >= 1
    assert widget.list_widget.item(0).text().startswith("box z")
    widget.go_to_next()
    centre = widget.queue.position(0)
    assert viewer.dims.current_step[0] == centre[0]


def test_cancel_changes_nothing(viewer, widget, qtbot, notifications):
    big = np.random.default_rng(2).random((12, 128, 128)).astype(np.float32)
    viewer.add_image(big, name="big")
    model_holder(viewer).set(tiny_model(), source="test model", trained=True)
    widget.select_layer("big")
    widget.run()
    widget.cancel()
    wait_for(qtbot, widget)
    assert "big uncertainty" not in viewer.layers
    assert widget.list_widget.count() == 0
    assert not any("Unexpected" in m for m in notifications)


def test_plain_errors(viewer, widget, stack, qtbot, notifications):
    widget.select_layer("stack")
    assert widget.run() is None
    assert any("No model loaded" in m for m in notifications)

    model_holder(viewer).set(tiny_model(3), source="test 3d", trained=True)
    viewer.add_image(np.zeros((32, 32), np.float32), name="flat")
    widget.select_layer("flat")
    widget.run()
    wait_for(qtbot, widget)
    assert any("3D model" in m for m in notifications)  # a 2D image does not fit a 3D model
    assert not any("Traceback" in m for m in notifications)

    notifications.clear()
    model_holder(viewer).set(tiny_model(), source="fresh unet", trained=False)
    widget.select_layer("stack")
    widget.run()
    assert any("untrained" in m for m in notifications)
    viewer.layers.remove("stack")  # deleted while the worker runs
    wait_for(qtbot, widget)
    assert any("was deleted" in m for m in notifications)
    assert "stack uncertainty" not in viewer.layers


def test_go_to_next_before_ranking(widget, notifications):
    widget.go_to_next()
    assert any("Nothing ranked" in m for m in notifications)
