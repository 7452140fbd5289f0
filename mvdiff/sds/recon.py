"""Posed-view reconstruction losses (RGB + mask on given cameras)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["composite", "posed_view_loss"]


def composite(rgba: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """Straight-alpha ``[V, 4, H, W]`` over a background ``[3]`` or ``[V, 3]`` -> ``[V, 3, H, W]``."""
    v = rgba.shape[0]
    bg = background.to(rgba).reshape(-1, 3).expand(v, 3)[:, :, None, None]  # (V, 3) -> (V, 3, 1, 1)
    a = rgba[:, 3:4]
    return rgba[:, :3] * a + bg * (1.0 - a)


def posed_view_loss(out: dict, target_rgba: torch.Tensor, background, mask_weight: float = 0.5):
    """MSE of the render (over ``background``) against the target composited over the same
    background, plus ``mask_weight`` * MSE of opacity against the target alpha."""
    bg = torch.as_tensor(background, dtype=target_rgba.dtype)
    rgb_loss = F.mse_loss(out["rgb"], composite(target_rgba, bg))
    mask_loss = F.mse_loss(out["opacity"], target_rgba[:, 3:4])
    return rgb_loss + mask_weight * mask_loss
