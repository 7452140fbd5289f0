"""Test tools for SDS without a trained model: a known object and an oracle "UNet".

:class:`ReferenceObject` is an analytic radiance field (a soft ellipsoid whose colour varies
with position, so every side looks different) rendered by our own renderer. :class:`OracleUNet`
has the call signature of :class:`~mvdiff.models.MultiViewUNet2DConditionModel` and predicts
the noise that points from ``x_t`` to the ground-truth renders at the current cameras
(``set_target``): ``eps = (x_t - sqrt(a_t) * x0_gt) / sqrt(1 - a_t)``. It ignores the
prompt, so its conditional and unconditional predictions agree and CFG is a no-op. With
``vae=None`` the guidance works in pixel space (the identity "VAE"), which keeps tests cheap.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn as nn

__all__ = ["OracleUNet", "ReferenceObject"]


class ReferenceObject(nn.Module):
    """Soft ellipsoid with semi-axes ``axes`` and a position-dependent colour."""

    def __init__(self, axes=(0.4, 0.25, 0.3), bound: float = 0.6, sharpness: float = 40.0):
        super().__init__()
        self.bound = float(bound)
        self.register_buffer("axes", torch.tensor(axes, dtype=torch.float32))
        self.sharpness = sharpness

    def forward(self, x: torch.Tensor):
        """``x`` ``[N, 3]`` -> (density ``[N]``, colour ``[N, 3]``)."""
        q = (x / self.axes).norm(dim=-1)
        sdf = (q - 1.0) * self.axes.min()  # approximate distance, negative inside
        sigma = 80.0 * torch.sigmoid(-sdf * self.sharpness)
        color = (0.5 + 1.2 * x[:, [0, 1, 2]] * torch.tensor([1.0, -1.0, 1.0])).clamp(0.05, 0.95)
        color = torch.stack([color[:, 0], color[:, 1], 0.5 * (color[:, 2] + 1 - color[:, 0])], -1)
        return sigma, color

    def density(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)[0]


class OracleUNet:
    """Predicts the noise towards ``target`` (pixels in [-1, 1], ``[N, C, h, w]``)."""

    def __init__(self, alphas_cumprod: torch.Tensor, sample_size: int):
        self.alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float32)
        self.config = SimpleNamespace(sample_size=sample_size)
        self.target = None

    def set_target(self, target: torch.Tensor) -> None:
        self.target = target

    def __call__(self, sample, timestep, encoder_hidden_states=None, camera=None, num_views=1):
        t = torch.as_tensor(timestep).reshape(-1)  # () | (N,) -> (N,)
        a = self.alphas_cumprod[t].reshape(-1, 1, 1, 1)  # (N,) -> (N, 1, 1, 1)
        reps = sample.shape[0] // self.target.shape[0]
        x0 = self.target.repeat(reps, 1, 1, 1)  # (N, C, h, w) -> (reps*N, C, h, w)
        return SimpleNamespace(sample=(sample - a.sqrt() * x0) / (1 - a).sqrt())
