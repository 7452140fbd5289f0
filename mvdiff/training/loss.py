"""The multi-view diffusion objective: MSE with one timestep per object (docs/design.md §6).

All views of an object share the timestep and each view gets its own noise. 2D batches are
the same code with ``num_views=1`` and no camera. The target is what the noise scheduler's
``prediction_type`` says the UNet outputs, as diffusers names it: ``epsilon`` (the noise),
``v_prediction`` (``sqrt(a) eps - sqrt(1 - a) x0``) or ``sample`` (the clean latents x0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "diffusion_loss",
    "encode_images",
    "encode_prompts",
    "loss_target",
    "min_snr_weights",
]


@torch.no_grad()
def encode_images(vae, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """uint8 ``[B, V, 3, H, W]`` -> scaled latents ``[B*V, 4, H/8, W/8]`` (frozen VAE)."""
    b, v, c, h, w = pixels.shape
    x = pixels.reshape(b * v, c, h, w)  # (B, V, 3, H, W) -> (B*V, 3, H, W)
    x = x.to(device=vae.device, dtype=vae.dtype) / 127.5 - 1.0
    dist = vae.encode(x).latent_dist
    noise = torch.randn(dist.mean.shape, generator=generator, dtype=torch.float32)
    latents = dist.mean + dist.std * noise.to(device=dist.mean.device, dtype=dist.mean.dtype)
    return latents.float() * vae.config.scaling_factor


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, captions: list[str]) -> torch.Tensor:
    """Captions -> text embeddings ``[B, L, D]`` (last hidden state, frozen encoder)."""
    ids = tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return text_encoder(ids.to(text_encoder.device))[0]


def min_snr_weights(
    scheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str = "epsilon"
) -> torch.Tensor:
    """Min-SNR-gamma weights per sample, for the loss of ``prediction_type``: the weight
    ``min(SNR, gamma)`` of the x0-MSE expressed on each target (eps-MSE = SNR x0-MSE,
    v-MSE = (SNR + 1) x0-MSE): ``min(SNR, gamma) / SNR`` (epsilon), ``/ (SNR + 1)``
    (v_prediction), ``min(SNR, gamma)`` (sample)."""
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alphas / (1.0 - alphas)
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    if prediction_type == "sample":
        return clipped
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def loss_target(scheduler, latents, noise, timesteps) -> torch.Tensor:
    """What the UNet should output, by ``scheduler.config.prediction_type``."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise ValueError(f"unknown prediction_type {kind!r} (epsilon, v_prediction or sample)")


def diffusion_loss(
    unet,
    scheduler,
    latents: torch.Tensor,
    text: torch.Tensor,
    camera: torch.Tensor | None,
    num_views: int,
    generator: torch.Generator,
    snr_gamma: float = 0.0,
    noise_offset: float = 0.0,
) -> torch.Tensor:
    """MSE of ``unet`` on latents ``[B*V, C, h, w]`` with text ``[B, L, D]`` against the
    target of ``scheduler.config.prediction_type`` (:func:`loss_target`).

    ``camera`` is ``[B*V, 16]`` or None (2D mode). One timestep per object, shared by its
    ``num_views`` views, uniform over the training timesteps; noise (and offset noise)
    independent per view.
    """
    n, c = latents.shape[:2]
    b = n // num_views
    device = latents.device
    noise = torch.randn(latents.shape, generator=generator).to(device)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((n, c, 1, 1), generator=generator).to(device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator)
    t = t.to(device).repeat_interleave(num_views)  # (B,) -> (B*V,)
    noisy = scheduler.add_noise(latents, noise, t)
    text = text.repeat_interleave(num_views, dim=0)  # (B, L, D) -> (B*V, L, D)
    pred = unet(noisy, t, text, camera=camera, num_views=num_views).sample
    target = loss_target(scheduler, latents, noise, t)
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma:
        kind = scheduler.config.prediction_type
        per_sample = per_sample * min_snr_weights(scheduler, t, snr_gamma, kind)
    return per_sample.mean()
