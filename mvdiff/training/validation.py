"""Validation samples during training: a grid of ``num_views`` views per prompt.

Uses :class:`mvdiff.pipelines.MVDreamPipeline` when it is importable, else a plain DDIM
loop with classifier-free guidance (:func:`sample_views`) on the same components, so the
training loop never depends on the pipeline package.
"""

from __future__ import annotations

import numpy as np
import torch

from mvdiff.cameras import get_camera

__all__ = ["image_grid", "sample_views", "validation_grid"]


@torch.no_grad()
def sample_views(
    unet,
    vae,
    text_encoder,
    tokenizer,
    scheduler,
    prompt: str,
    num_views: int = 4,
    elevation: float = 15.0,
    resolution: int = 256,
    steps: int = 20,
    guidance_scale: float = 7.5,
    generator: torch.Generator | None = None,
) -> np.ndarray:
    """DDIM + CFG sampling of ``num_views`` views of one prompt -> uint8 ``[V, H, W, 3]``."""
    from diffusers import DDIMScheduler

    from mvdiff.training.loss import encode_prompts

    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    sched = DDIMScheduler.from_config(scheduler.config)
    sched.set_timesteps(steps)
    text = encode_prompts(tokenizer, text_encoder, ["", prompt]).to(device, dtype)  # (2, L, D)
    text = text.repeat_interleave(num_views, dim=0)  # (2, L, D) -> (2*V, L, D)
    camera = get_camera(num_views, elevation).to(device, dtype).repeat(2, 1)  # (V,16)->(2V,16)
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    shape = (num_views, unet.config.in_channels, resolution // scale, resolution // scale)
    latents = torch.randn(shape, generator=generator).to(device, dtype) * sched.init_noise_sigma
    for t in sched.timesteps:
        model_in = sched.scale_model_input(torch.cat([latents, latents]), t)  # (2V, C, h, w)
        eps = unet(model_in, t, text, camera=camera, num_views=num_views).sample
        eps_uncond, eps_cond = eps.chunk(2)
        eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        latents = sched.step(eps, t, latents).prev_sample
    images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()  # (V, 3, H, W) -> (V, H, W, 3)


def image_grid(rows: list[np.ndarray]) -> np.ndarray:
    """A list of ``[V, H, W, 3]`` (one row per prompt) -> one ``[R*H, V*W, 3]`` image."""
    return np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)


def validation_grid(
    unet, vae, text_encoder, tokenizer, scheduler, prompts, resolution, cfg
) -> np.ndarray:
    """Sample every prompt (MVDreamPipeline if available, else :func:`sample_views`)."""
    rows = []
    try:
        from mvdiff.pipelines import MVDreamPipeline
    except ImportError:
        MVDreamPipeline = None
    pipe = None
    if MVDreamPipeline is not None:
        try:
            pipe = MVDreamPipeline(
                unet=unet,
                vae=vae,
                text_encoder=text_encoder,
                tokenizer=tokenizer,
                scheduler=scheduler,
            )
            pipe.set_progress_bar_config(disable=True)
        except Exception:  # noqa: BLE001 - an incompatible pipeline must not stop training
            pipe = None
    for i, prompt in enumerate(prompts):
        generator = torch.Generator().manual_seed(cfg.seed + i)
        if pipe is not None:
            out = pipe(
                prompt,
                num_views=cfg.num_views,
                elevation=cfg.elevation,
                height=resolution,
                width=resolution,
                num_inference_steps=cfg.steps,
                guidance_scale=cfg.guidance_scale,
                generator=generator,
                output_type="np",
            )
            images = np.asarray(out.images)
            if images.dtype != np.uint8:
                images = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
        else:
            images = sample_views(
                unet,
                vae,
                text_encoder,
                tokenizer,
                scheduler,
                prompt,
                num_views=cfg.num_views,
                elevation=cfg.elevation,
                resolution=resolution,
                steps=cfg.steps,
                guidance_scale=cfg.guidance_scale,
                generator=generator,
            )
        rows.append(images)
    return image_grid(rows)
