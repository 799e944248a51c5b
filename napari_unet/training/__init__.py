"""The training engine: a step loop that reports through events and stops on request.

``Trainer.run()`` is a generator: it yields a :class:`TrainEvent` after every optimisation step,
every validation and every preview, then a final ``"finished"`` event. A GUI iterates it inside a
worker thread; ``Trainer.stop()`` (thread-safe) ends the run before the next step. Nothing here
imports napari or Qt.

Typical use::

    trainer = Trainer(build_model("unet", width=16), images, labels,
                      config=TrainConfig(time_budget=600))
    history = trainer.fit()          # or: for event in trainer.run(): ...
    trainer.save("model.pt")

Modules, one job each: ``config`` (settings, events, errors), ``trainer`` (the loop),
``samples`` (the data and its replay mix), ``schedule`` (learning rate, Dice fade, augmentation
ramp), ``averaging`` (the weight average), ``validation`` (scores, label offset), ``selection``
(which weights are kept), ``precision`` (mixed precision).
"""

from ..data import AugmentConfig as AugmentConfig
from ..data import PatchSampler as PatchSampler
from . import averaging, schedule, validation
from .config import (
    TrainConfig,
    TrainEvent,
    TrainingError,
    TrainingOutOfMemory,
    default_patch_size,
)
from .trainer import Trainer

__all__ = [
    "TrainConfig",
    "TrainEvent",
    "Trainer",
    "TrainingError",
    "TrainingOutOfMemory",
    "default_patch_size",
]

# names that tests and benchmarks imported from the single-module ``training``; a patch must go
# where a name is looked up (``training.trainer.PatchSampler``, ``training.validation._WHOLE_SAMPLE_PIXELS``)
_WeightAverage = averaging.WeightAverage
_has_cross_entropy_term = schedule.has_cross_entropy_term
_WHOLE_SAMPLE_PIXELS = validation._WHOLE_SAMPLE_PIXELS
