"""The napari widgets (Segment, Fine-tune) and the helpers they share.

Widgets only wire napari layers to the engine: long work runs through :mod:`._qt.workers`, the model
a viewer works with lives in :mod:`._qt.shared`.
"""
