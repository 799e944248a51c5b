"""napari-unet: segment EM stacks and 3D volumes with UNet variants, correct, fine-tune, all in napari.

The engine (models, data, training, inference) never imports napari or Qt; the widgets live in ``_qt``.
"""

__version__ = "0.1.0"
