"""Fixtures shared by the widget tests."""

from __future__ import annotations

import pytest
from napari.utils.notifications import notification_manager


@pytest.fixture
def notifications():
    """Messages of the napari notifications dispatched during the test."""
    messages: list[str] = []

    def record(event) -> None:
        messages.append(event.message)

    notification_manager.notification_ready.connect(record)
    yield messages
    notification_manager.notification_ready.disconnect(record)


@pytest.fixture
def viewer(make_napari_viewer):
    return make_napari_viewer()
