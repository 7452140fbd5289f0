"""The image-conditioned (ImageDream) mode of joint training as a task (``image.enabled``).

The data are :class:`~mvdiff.training.tasks.joint.JointTask`'s (multi-view shards + 2D
pairs); each object also gets an image prompt, one of its own renders (the 2D images are their
own prompt), whose vision-tower tokens and VAE latent condition the UNet, with classifier-free
guidance drops. The pieces (reference views, tokens, drops, the MVDream -> ImageDream
initialisation) are :mod:`mvdiff.training.image_prompt`; the result is a model folder with the
vision tower that ``mvdiff sample --image`` and ``mvdiff image-to-3d`` load.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch

from mvdiff.errors import UserError
from mvdiff.training.image_prompt import (
    add_image_prompt,
    draw_drops,
    encode_reference,
    load_image_encoder,
    split_reference,
)
from mvdiff.training.tasks.base import Run, denoising_loss, drop_captions
from mvdiff.training.tasks.joint import JointTask

log = logging.getLogger("mvdiff.train")

__all__ = ["ImageTask"]


class ImageTask(JointTask):
    """Needs ``cfg.image`` (:class:`~mvdiff.training.image_prompt.ImagePromptConfig`)."""

    def __init__(self):
        self.image_encoder = self.processor = None

    def check(self, cfg) -> list[str]:
        image = cfg.image
        if image.reference_frame and not cfg.model.camera:
            raise UserError(
                "image.reference_frame needs the camera MLP (model.camera=true): the reference "
                "frame is the zero-camera view"
            )
        self.extra_views = 1 if image.reference == "extra" else 0
        return super().check(cfg)

    def describe(self, cfg) -> str:
        image = cfg.image
        return (
            f"image prompt: reference {image.reference}, frame "
            f"{'on' if image.reference_frame else 'off'}, drops image {image.drop_image:g} / "
            f"reference {image.drop_reference:g} / all {image.drop_all:g}; "
            f"{super().describe(cfg)}"
        )

    def setup(self, run: Run) -> None:
        """The vision tower (the model folder's, or ``image.encoder``), frozen; a UNet without
        an image prompt gets one (:func:`add_image_prompt`)."""
        cfg, parts = run.cfg.image, run.parts
        if parts.unet.class_embedding is None and cfg.reference_frame:
            raise UserError("image.reference_frame needs a multi-view UNet with a camera MLP")
        if parts.image_encoder is not None and not cfg.encoder:
            encoder, processor = parts.image_encoder, parts.feature_extractor
        else:
            encoder, processor = load_image_encoder(cfg.encoder, run.cfg.model.pretrained)
        width = encoder.config.hidden_size
        tokens = int(getattr(parts.unet.config, "num_image_tokens", 0) or 0)
        if tokens:
            if parts.unet.config.image_embed_dim != width:
                raise UserError(
                    f"image.encoder: the vision tower is {width} wide, the UNet's resampler "
                    f"takes {parts.unet.config.image_embed_dim}"
                )
            log.info("image prompt: the model's own (%d tokens)", tokens)
        else:
            parts.unet = add_image_prompt(parts.unet, cfg.num_tokens, width, cfg.init_ip)
            log.info("image prompt: new resampler (%d tokens), to_k_ip/to_v_ip init %s",
                     cfg.num_tokens, cfg.init_ip)  # fmt: skip
        dtype = parts.text_encoder.dtype  # the frozen parts' dtype (mixed precision)
        encoder.requires_grad_(False)
        self.image_encoder = encoder.eval().to(run.device, dtype=dtype)
        self.processor = processor
        parts.image_encoder, parts.feature_extractor = self.image_encoder, processor

    def batches(self, run: Run) -> Iterator[dict]:
        """JointTask's batches with the targets split from the reference view (``reference``
        uint8 ``[B, 3, H, W]``); micro-batch ``i`` of the run is number ``i`` here."""
        cfg = run.cfg
        index = run.start_step * cfg.gradient_accumulation_steps
        for batch in super().batches(run):
            yield split_reference(batch, cfg.data.num_views, cfg.image.reference, cfg.seed,
                                  run.rank, index)  # fmt: skip
            index += 1

    def loss(
        self, run: Run, batch: dict, index: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The denoising loss with the image tokens and (multi-view batches) the reference
        frame; the drops of :func:`draw_drops` zero them per object (and empty captions)."""
        cfg = run.cfg
        b = batch["reference"].shape[0]
        drops = draw_drops(cfg.image, b, cfg.seed, run.rank, index)
        captions = drop_captions(batch["caption"], cfg, run.rank, index)
        captions = ["" if d else c for c, d in zip(captions, drops["text"], strict=True)]
        frame = cfg.image.reference_frame and batch["camera"] is not None
        embeds, ref = encode_reference(self.image_encoder, self.processor, run.parts.vae,
                                       batch["reference"], generator, latents=frame)  # fmt: skip
        keep = torch.tensor([not d for d in drops["image"]], dtype=embeds.dtype)
        inputs = {"image_embeds": embeds * keep.to(embeds.device)[:, None, None]}  # (B, N, E)
        if ref is not None:
            keep_ref = torch.tensor([not d for d in drops["reference"]], dtype=ref.dtype)
            inputs["reference_latents"] = ref * keep_ref.to(ref.device)[:, None, None, None]
        loss = denoising_loss(run, batch["pixels"], captions, batch["camera"], generator, **inputs)
        return loss, {}
