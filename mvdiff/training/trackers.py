"""Experiment trackers through accelerate (``report_to`` in the training config).

``tensorboard`` writes event files under ``output_dir/logs/mvdiff`` (``tensorboard --logdir
runs/NAME/logs``), ``wandb`` logs to Weights & Biases (``wandb login`` first, or
``WANDB_MODE=offline``), ``all`` both (those installed), ``none`` neither. The loop logs loss,
learning rate, gradient norm and throughput every ``log_every`` steps, and
:func:`mvdiff.training.validation.log_images` the validation grids; ``log.jsonl`` is written
whatever the trackers.
"""

from __future__ import annotations

import importlib.util
import logging

from mvdiff.errors import UserError

log = logging.getLogger("mvdiff.train")

__all__ = ["tracker_config", "tracker_names"]

_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def _installed(name: str) -> bool:
    return importlib.util.find_spec(_MODULES[name]) is not None


def tracker_names(report_to: str) -> list[str]:
    """accelerate ``log_with`` names for ``report_to``. TensorBoard (the default) missing is a
    warning (``pip install 'mvdiff[train]'``); an explicit ``wandb`` missing is an error."""
    if report_to == "none":
        return []
    if report_to == "all":
        return [name for name in _MODULES if _installed(name)]
    if report_to not in _MODULES:
        raise UserError(f"report_to={report_to}: expected tensorboard, wandb, all or none")
    if _installed(report_to):
        return [report_to]
    if report_to == "wandb":
        raise UserError("report_to=wandb needs Weights & Biases: pip install wandb")
    log.warning("report_to=tensorboard but TensorBoard is not installed "
                "(pip install 'mvdiff[train]'): logging to log.jsonl only")  # fmt: skip
    return []


def tracker_config(cfg) -> dict:
    """The run's main settings as flat scalars (TensorBoard's hparams take nothing else)."""
    return {
        "output_dir": str(cfg.output_dir),
        "seed": cfg.seed,
        "max_steps": cfg.max_steps,
        "lr": cfg.optim.lr,
        "batch_size": cfg.data.batch_size,
        "num_views": cfg.data.num_views,
        "resolution": cfg.data.resolution,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "mixed_precision": cfg.mixed_precision,
        "pretrained": str(cfg.model.pretrained),
    }
