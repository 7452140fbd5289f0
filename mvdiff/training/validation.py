"""Validation samples during training: a grid of ``num_views`` views per prompt.

Prompts are used verbatim (no ", 3d asset" is appended). Sampling is
:class:`mvdiff.pipelines.MVDreamPipeline` on the training components with a DDIM scheduler
made from the training scheduler's config — the same code users sample with.
"""

from __future__ import annotations

import numpy as np
import torch

from mvdiff.cameras import get_camera

__all__ = ["image_grid", "render_views", "validation_grid"]


def image_grid(rows: list[np.ndarray]) -> np.ndarray:
    """A list of ``[V, H, W, 3]`` (one row per prompt) -> one ``[R*H, V*W, 3]`` image."""
    return np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)


def _pipeline(unet, vae, text_encoder, tokenizer, scheduler):
    """An MVDreamPipeline on the training components, sampling with DDIM."""
    from diffusers import DDIMScheduler

    from mvdiff.pipelines import MVDreamPipeline

    pipe = MVDreamPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=DDIMScheduler.from_config(scheduler.config),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render_views(
    unet,
    vae,
    text_encoder,
    tokenizer,
    scheduler,
    prompt: str,
    *,
    num_views: int = 4,
    elevation: float = 15.0,
    azimuth_start: float = 0.0,
    resolution: int = 256,
    steps: int = 20,
    guidance_scale: float = 7.5,
    generator: torch.Generator | None = None,
    pipe=None,
) -> tuple[np.ndarray, np.ndarray]:
    """``num_views`` views of ``prompt`` (used verbatim, no suffix) -> uint8 ``[V, H, W, 3]``
    and the camera vectors ``[V, 16]``. Validation grids and MVDreamBooth class images both
    come from here.
    """
    camera = get_camera(num_views, elevation, azimuth_start).numpy()
    if pipe is None:
        pipe = _pipeline(unet, vae, text_encoder, tokenizer, scheduler)
    out = pipe(
        prompt,
        num_views=num_views,
        elevation=elevation,
        azimuth_start=azimuth_start,
        height=resolution,
        width=resolution,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        generator=generator,
        prompt_suffix="",
        output_type="np",
    )
    images = (np.clip(np.asarray(out.images), 0, 1) * 255).round().astype(np.uint8)
    return images, camera


def validation_grid(
    unet, vae, text_encoder, tokenizer, scheduler, prompts, resolution, cfg
) -> np.ndarray:
    """Sample every prompt (verbatim) at seed ``cfg.seed + i``; one row of views per prompt."""
    pipe = _pipeline(unet, vae, text_encoder, tokenizer, scheduler)
    rows = []
    for i, prompt in enumerate(prompts):
        images, _ = render_views(
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
            generator=torch.Generator().manual_seed(cfg.seed + i),
            pipe=pipe,
        )
        rows.append(images)
    return image_grid(rows)
