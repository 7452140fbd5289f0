"""What a training task is: the loop's state (:class:`Run`) and the hooks a task fills in
(:class:`Task`), plus the one denoising loss every task builds on (:func:`denoising_loss`).

The loop (:func:`mvdiff.training.trainer.train`) owns everything that is the same for every
task: the accelerator, the components, optimizer, learning rate, resume, gradient
accumulation, NaN / overflow handling, EMA, logging, checkpoints, validation, and the end of
the run. A task says what is different, through these methods, called in this order:

1. :meth:`Task.check` — before anything is loaded: cheap checks of its inputs (one-line
   :class:`~mvdiff.errors.UserError`), returns warnings to log;
2. :meth:`Task.setup` — the components are loaded (``run.parts``; the UNet not yet wrapped
   for DDP): generate data with the starting model, add adapters (LoRA) ...;
3. :meth:`Task.start` — after ``accelerator.prepare`` and before a resume: remember the
   starting weights (``run.trainable``) ...;
4. :meth:`Task.batches` — the batch stream of this rank, starting at ``run.start_step``;
5. :meth:`Task.loss` — one micro-batch -> the loss to minimise and the extra terms it logs
   (named in :attr:`Task.terms`); runs on every rank, every micro-step;
6. :meth:`Task.log_values`, :meth:`Task.validation_prompts` — extra log values, what the
   validation grids show;
7. :meth:`Task.export` — main process, EMA weights in place: write the result, return the
   summary entries naming it; :meth:`Task.summary` adds anything else to the summary.

Which task a run gets: :func:`mvdiff.training.tasks.task_for` (by the config's type), or the
caller passes one to :func:`~mvdiff.training.trainer.train`.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from mvdiff.data.shards import make_seed
from mvdiff.training.loss import diffusion_loss, encode_images, encode_prompts
from mvdiff.training.sharded import is_sharded

__all__ = ["Run", "Task", "denoising_loss", "drop_captions"]


@dataclass
class Run:
    """The state of one training run that tasks read (filled in by the loop as it goes)."""

    cfg: Any  # TrainConfig or a subclass
    accelerator: Any
    out: Path
    #: the components (:class:`~mvdiff.training.components.Components`): frozen VAE, text
    #: encoder, tokenizer, the sampling scheduler (exported), the UNet as loaded
    parts: Any
    #: the training noise schedule (DDPM, ``cfg.prediction_type``)
    noise_scheduler: Any
    #: the trainable UNet as ``accelerator.prepare`` returned it (DDP-wrapped on N GPUs)
    unet: Any = None
    #: its trainable parameters (unwrapped), in a fixed order
    trainable: list = field(default_factory=list)
    #: the optimizer step the run starts at (> 0 after a resume)
    start_step: int = 0

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def model(self):
        """The UNet without its DDP / compile wrappers."""
        return self.accelerator.unwrap_model(self.unet)


class Task:
    """The hooks of one kind of training; the defaults do nothing (see the module docstring)."""

    #: the extra loss terms :meth:`loss` returns, logged as window means under these names
    terms: ClassVar[tuple[str, ...]] = ()

    def check(self, cfg) -> list[str]:
        """Check the inputs before any model is loaded; returns warnings to log."""
        return []

    def describe(self, cfg) -> str:
        """The end of the one-line config summary logged at the start (what is trained on)."""
        return ""

    def base_lr(self, cfg) -> float:
        """The peak learning rate (the schedule scales it)."""
        return cfg.optim.lr

    def setup(self, run: Run) -> None:
        """Components loaded, UNet not yet prepared: change it (adapters), make data."""

    def start(self, run: Run) -> None:
        """The UNet and optimizer are prepared; a resume comes next."""

    def batches(self, run: Run) -> Iterator[dict]:
        """The batches of this rank from micro-step ``run.start_step * accumulation``."""
        raise NotImplementedError

    def loss(
        self, run: Run, batch: dict, index: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Micro-batch number ``index`` (of this rank) -> (loss, {term: value}); every random
        draw from ``generator`` (seeded with ``(seed, rank, index)``)."""
        raise NotImplementedError

    def log_values(self, run: Run) -> dict[str, float]:
        """Extra values for the log line (main process reads them at every log step)."""
        return {}

    def validation_prompts(self, cfg) -> list[str]:
        return list(cfg.validation.prompts)

    def summary(self, run: Run) -> dict:
        """Extra entries of summary.json."""
        return {}

    def export(self, run: Run) -> dict[str, str]:
        """Write the result; returns summary entries, e.g. ``{"model": path}``. Called on
        **every** rank with the EMA weights swapped in (gathering sharded weights is a
        collective under FSDP / ZeRO-3); only the main process writes files."""
        return {}


def drop_captions(captions: list[str], cfg, rank: int, index: int) -> list[str]:
    """Each caption replaced by "" with probability ``cfg.caption_dropout`` (classifier-free
    guidance), drawn from ``(seed, rank, index, i)``."""
    return [
        "" if random.Random(make_seed("drop", cfg.seed, rank, index, i)).random()
        < cfg.caption_dropout else c
        for i, c in enumerate(captions)
    ]  # fmt: skip


def denoising_loss(
    run: Run,
    pixels: torch.Tensor,
    captions: list[str],
    camera: torch.Tensor | None,
    generator: torch.Generator,
    **unet_inputs,
) -> torch.Tensor:
    """The diffusion loss (:func:`~mvdiff.training.loss.diffusion_loss`) of the trained UNet
    on uint8 ``pixels [B, V, 3, H, W]`` with ``captions`` (B) and cameras ``[B, V, 16]`` (None:
    2D mode; ignored when ``model.camera`` is false), with the run's prediction type, SNR
    weighting and offset noise. ``unet_inputs`` (``image_embeds``, ``reference_latents``: the
    image-conditioned task) go to :func:`~mvdiff.training.loss.diffusion_loss`."""
    cfg = run.cfg
    b, v = pixels.shape[:2]
    latents = encode_images(run.parts.vae, pixels.to(run.device), generator)  # (B*V, C, h, w)
    text = encode_prompts(run.parts.tokenizer, run.parts.text_encoder, captions)  # (B, L, D)
    if camera is not None and cfg.model.camera:
        camera = camera.reshape(b * v, -1).to(run.device)  # (B, V, 16) -> (B*V, 16)
    else:
        camera = None
    with run.accelerator.autocast():
        loss = diffusion_loss(
            run.unet, run.noise_scheduler, latents, text.float(), camera, v, generator,
            snr_gamma=cfg.snr_gamma, noise_offset=cfg.noise_offset, **unet_inputs,
        )  # fmt: skip
        mlp = run.model.class_embedding
        if camera is None and mlp is not None and not is_sharded(run.accelerator):  # FSDP: no
            # the camera MLP is skipped: a zero term keeps DDP's set of used parameters the
            # same on every rank and step
            loss = loss + 0.0 * sum(p.sum() for p in mlp.parameters())
    return loss
