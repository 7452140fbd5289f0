"""Training tasks: what one kind of training adds to the loop (see :mod:`.base`).

* :class:`JointTask` — MVDream's joint multi-view + 2D training (``mvdiff train``);
* :class:`DreamBoothTask` — MVDreamBooth from photos (``mvdiff dreambooth``);
* :class:`ImageTask` — joint training of the image-conditioned (ImageDream) mode
  (``image.enabled``).

A new task is one module here: a :class:`Task` subclass, and a line in :func:`task_for` for
the config type that selects it (or pass the object to
:func:`mvdiff.training.trainer.train`).
"""

from __future__ import annotations

from mvdiff.training.tasks.base import Run, Task, denoising_loss, drop_captions
from mvdiff.training.tasks.dreambooth import DreamBoothTask
from mvdiff.training.tasks.image import ImageTask
from mvdiff.training.tasks.joint import JointTask

__all__ = [
    "DreamBoothTask",
    "ImageTask",
    "JointTask",
    "Run",
    "Task",
    "denoising_loss",
    "drop_captions",
    "task_for",
]


def task_for(cfg) -> Task:
    """The task of a config, by its type (the one place that maps configs to tasks)."""
    from mvdiff.errors import UserError
    from mvdiff.training.config import DreamBoothTrainConfig

    image = getattr(cfg, "image", None)
    if isinstance(cfg, DreamBoothTrainConfig):
        if image is not None and image.enabled:
            raise UserError("image.enabled: not available in DreamBooth mode (train on shards)")
        return DreamBoothTask()
    if image is not None and image.enabled:
        return ImageTask()
    return JointTask()
