"""PixelUnshuffleAutoencoder: an exact, invertible, parameter-free "VAE" for pixel-space models.

``encode`` folds every ``patch x patch`` block of pixels into channels (pixel-unshuffle):
images ``[N, 3, H, W]`` in [-1, 1] <-> latents ``[N, 3 patch², H/patch, W/patch]``;
``decode`` unfolds them (pixel-shuffle). Nothing is learned and nothing is lost, so a tiny UNet
trained on these latents learns the images themselves, not the noise of a random
``AutoencoderKL`` (the tiny models of the quickstart and ``benchmarks/learning_check.py``).

It has the interface the trainer (:func:`mvdiff.training.loss.encode_images`),
:class:`~mvdiff.pipelines.MVDreamPipeline` and the SDS guidance use of a diffusers VAE:
``encode(x).latent_dist`` (a deterministic ``DiagonalGaussianDistribution``: ``mean``,
``std`` = 0, ``sample()``), ``decode(z).sample``, ``config.scaling_factor`` (1),
``config.shift_factor`` (None) and ``config.block_out_channels`` (``log2(patch) + 1``
entries, so that ``2 ** (len - 1)`` is the downsampling factor, as for ``AutoencoderKL``).
It saves and loads with ``save_pretrained`` / ``from_pretrained`` like any diffusers model
(a ``config.json`` and a weights file holding one zero), as the ``vae/`` of a model folder.

``white_zero`` shifts the images by -1 before folding, so that white (the background of
rendered objects) is 0 in latent space: GroupNorm removes per-channel means, and a model
whose targets sit on a constant offset learns much more slowly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# diffusers' pipeline loader recognises a component as a model by looking `ModelMixin` up by
# name in the module its model_index.json names, so it must be importable from here.
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput

__all__ = ["PixelUnshuffleAutoencoder"]


class PixelUnshuffleAutoencoder(ModelMixin, ConfigMixin):
    """Pixel-unshuffle by ``patch`` (a power of two); see the module docstring."""

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        patch: int = 2,
        white_zero: bool = True,
        in_channels: int = 3,
        scaling_factor: float = 1.0,
        shift_factor: float | None = None,
        block_out_channels: list[int] | None = None,
        latent_channels: int | None = None,
    ):
        super().__init__()
        if patch < 1 or patch & (patch - 1):
            raise ValueError(f"patch must be a power of two, got {patch}")
        levels = int(math.log2(patch)) + 1
        # derived entries, written to the config so readers of vae.config find them
        self.register_to_config(
            block_out_channels=[in_channels] * levels,
            latent_channels=in_channels * patch**2,
        )
        self.patch = patch
        self.offset = 1.0 if white_zero else 0.0
        # no weights: one saved buffer gives the module a device, a dtype and a weights file
        # (diffusers' from_pretrained wants one)
        self.register_buffer("anchor", torch.zeros(1))

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """Images ``[N, C, H, W]`` in [-1, 1] -> ``latent_dist`` over ``[N, C p², H/p, W/p]``."""
        n, c, h, w = x.shape
        if h % self.patch or w % self.patch:
            raise ValueError(f"image size {h}x{w} is not a multiple of patch={self.patch}")
        z = F.pixel_unshuffle(x - self.offset, self.patch)  # (N, C, H, W) -> (N, C p², H/p, W/p)
        # mean and log-variance stacked on channels, as AutoencoderKL's encoder writes them;
        # deterministic: std = 0, sample() = mean
        dist = DiagonalGaussianDistribution(torch.cat([z, torch.zeros_like(z)], 1), True)
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None):
        """Latents ``[N, C p², h, w]`` -> images ``[N, C, h p, w p]`` in [-1, 1]."""
        x = F.pixel_shuffle(z, self.patch) + self.offset  # (N, C p², h, w) -> (N, C, hp, wp)
        return DecoderOutput(sample=x) if return_dict else (x,)

    def forward(self, sample: torch.Tensor, return_dict: bool = True):
        x = self.decode(self.encode(sample).latent_dist.mean).sample
        return DecoderOutput(sample=x) if return_dict else (x,)
