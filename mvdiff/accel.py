"""Process-wide switches for NVIDIA GPUs (no effect on other devices)."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

__all__ = ["enable_tf32"]


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
