"""The checkpoint the demo loads is really trained: it segments the EM sample's held-out slices."""

import pytest

from napari_unet._sample_data import SAMPLE_MODEL, load_sample
from napari_unet.checkpoint import load_checkpoint
from napari_unet.inference import predict, probabilities_to_labels
from napari_unet.metrics import dice_per_class


@pytest.mark.skipif(not SAMPLE_MODEL.is_file(), reason="sample model not made (scripts/make_sample_model.py)")
def test_sample_model_segments_the_held_out_sample_slices():
    checkpoint = load_checkpoint(SAMPLE_MODEL)
    image, labels = load_sample("em_membranes")
    held_out = slice(6, 8)  # scripts/make_sample_model.py trains on slices 0-5
    probabilities = predict(checkpoint.model, image[held_out], device="cpu")
    membrane_dice, cell_dice = dice_per_class(probabilities_to_labels(probabilities), labels[held_out], 2)
    assert membrane_dice > 0.8 and cell_dice > 0.9
