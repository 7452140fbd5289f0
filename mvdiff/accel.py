"""Process-wide switches for NVIDIA GPUs (no effect on other devices), and the training
precision chosen by the config or the launcher."""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)

__all__ = ["enable_tf32", "frozen_dtype", "mixed_precision_choice"]


def enable_tf32(device) -> bool:
    """On CUDA, let float32 matmuls and convolutions use TF32 tensor cores (Ampere and later:
    several times faster, 10-bit mantissa inputs, fp32 accumulation — what diffusion training
    and SDS tolerate). Returns whether it was switched on."""
    if torch.device(device).type != "cuda":
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    log.info("TF32 matmuls/convolutions enabled")
    return True


def mixed_precision_choice(value: str) -> str | None:
    """``Accelerator(mixed_precision=...)`` for the training config's ``mixed_precision``.

    ``"auto"`` -> None: the launcher's choice (``accelerate launch --mixed_precision`` or the
    accelerate config file, which ``accelerate launch`` passes on as
    ``ACCELERATE_MIXED_PRECISION``; ``no`` without a launcher). An explicit value wins, with a
    warning when the launcher asked for another one."""
    if value == "auto":
        return None
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "")
    if launcher and launcher != value:
        log.warning(
            "mixed_precision=%s from the training config overrides the launcher's %s "
            "(set mixed_precision: auto to follow the launcher)",
            value,
            launcher,
        )
    return value


def frozen_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype of the frozen VAE / text encoder for accelerate's resolved
    ``accelerator.mixed_precision``."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)
