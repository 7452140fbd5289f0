"""Training tasks: what one kind of training adds to the loop (see :mod:`.base`).

* :class:`JointTask` — MVDream's joint multi-view + 2D training (``mvdiff train``);
* :class:`DreamBoothTask` — MVDreamBooth from photos (``mvdiff dreambooth``).

A new task is one module here: a :class:`Task` subclass, and a line in :func:`task_for` for
the config type that selects it (or pass the object to
:func:`mvdiff.training.trainer.train`).
"""

from __future__ import annotations

from mvdiff.training.tasks.base import Run, Task, denoising_loss, drop_captions
from mvdiff.training.tasks.dreambooth import DreamBoothTask
from mvdiff.training.tasks.joint import JointTask

__all__ = [
    "DreamBoothTask",
    "JointTask",
    "Run",
    "Task",
    "denoising_loss",
    "drop_captions",
    "task_for",
]


def task_for(cfg) -> Task:
    """The task of a config, by its type (the one place that maps configs to tasks)."""
    from mvdiff.training.config import DreamBoothTrainConfig

    if isinstance(cfg, DreamBoothTrainConfig):
        return DreamBoothTask()
    return JointTask()
