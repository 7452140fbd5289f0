"""Validation samples during training: a grid of ``num_views`` views per prompt.

Prompts are used verbatim (no ", 3d asset" is appended). Sampling is
:class:`mvdiff.pipelines.MVDreamPipeline` on the training components with a DDIM scheduler
made from the training scheduler's config — the same code users sample with.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mvdiff.cameras import get_camera

__all__ = ["image_grid", "log_images", "render_views", "run_validation", "validation_grid"]


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


def run_validation(accelerator, unet, parts, cfg, prompts, step: int, out_dir, *, vae=None,
                   text_encoder=None, ema=None, trainable=None, cache=None):  # fmt: skip
    """Validation samples of the model being trained; call on **every** rank.

    The main process samples ``prompts`` (EMA weights when ``ema``) with ``cfg.validation``,
    writes ``out_dir/samples/step-NNNNNNN.png`` and logs the grid to the trackers. Under DDP it
    samples with the trained module itself; under FSDP / ZeRO-3 every rank first takes part in
    gathering the weights into an ordinary copy of the UNet on the main process (``cache``:
    the copy returned by the previous call, reused). Returns ``(grid or None, cache)``."""
    from PIL import Image

    from mvdiff.training.sharded import full_state_dict, is_sharded, plain_copy

    vae = parts.vae if vae is None else vae
    text_encoder = parts.text_encoder if text_encoder is None else text_encoder
    grid = None
    if is_sharded(accelerator):
        state = full_state_dict(accelerator, unet, ema, trainable)  # collective
        if accelerator.is_main_process:
            cache = plain_copy(accelerator, unet, state, into=cache)
            del state
            cache.eval()
            with accelerator.autocast():
                grid = validation_grid(cache, vae, text_encoder, parts.tokenizer,
                                       parts.scheduler, prompts, cfg.data.resolution,
                                       cfg.validation)  # fmt: skip
    elif accelerator.is_main_process:
        base = accelerator.unwrap_model(unet)
        if ema is not None:
            ema.store(trainable)
            ema.copy_to(trainable)
        base.eval()
        try:
            with accelerator.autocast():
                grid = validation_grid(base, vae, text_encoder, parts.tokenizer,
                                       parts.scheduler, prompts, cfg.data.resolution,
                                       cfg.validation)  # fmt: skip
        finally:
            base.train()
            if ema is not None:
                ema.restore(trainable)
    if grid is not None:
        path = Path(out_dir) / "samples" / f"step-{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid).save(path)
        log_images(accelerator, "validation", grid, step)
    accelerator.wait_for_everyone()
    return grid, cache


def log_images(accelerator, name: str, image: np.ndarray, step: int) -> None:
    """Log a uint8 ``[H, W, 3]`` image to every started tracker that takes images
    (TensorBoard, Weights & Biases); main process only."""
    if not accelerator.is_main_process:
        return
    for tracker in getattr(accelerator, "trackers", []):
        if tracker.name == "tensorboard":
            tracker.writer.add_image(name, image, step, dataformats="HWC")
            tracker.writer.flush()
        elif tracker.name == "wandb":
            import wandb

            tracker.run.log({name: [wandb.Image(image)]}, step=step)
