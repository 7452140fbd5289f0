"""Joint training (MVDream): multi-view objects from shards and 2D image-text pairs, mixed per
batch (``data.p_2d``), one denoising loss; the result is a diffusers model folder."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch

from mvdiff.data.loader import build_loader
from mvdiff.data.mixer import BatchMixer
from mvdiff.data.shards import expand_urls, make_seed
from mvdiff.errors import UserError
from mvdiff.training.tasks.base import Run, Task, denoising_loss, drop_captions

log = logging.getLogger("mvdiff.train")

__all__ = ["JointTask"]


class JointTask(Task):
    """``data.mv_shards`` (multi-view, with cameras) + ``data.shards_2d`` (2D, no camera)."""

    #: views decoded per multi-view sample beyond ``data.num_views`` (the image task's
    #: reference view)
    extra_views: int = 0

    def check(self, cfg) -> list[str]:
        d = cfg.data
        if not d.mv_shards and not d.shards_2d:
            raise UserError("no training data: set data.mv_shards and/or data.shards_2d")
        for key in ("mv_shards", "shards_2d"):
            if getattr(d, key):
                try:
                    expand_urls(getattr(d, key), f"data.{key}")  # names a missing file now
                except UserError as e:
                    if not d.missing_hint:
                        raise
                    raise UserError(f"{e}; {d.missing_hint}") from None  # how to make it
        if d.p_2d > 0 and not d.shards_2d and d.mv_shards:
            return [f"data.p_2d={d.p_2d} but data.shards_2d is empty: training on 3D only"]
        return []

    def describe(self, cfg) -> str:
        d = cfg.data
        data = ", ".join(f"{k} {v}" for k, v in (("3D", d.mv_shards), ("2D", d.shards_2d)) if v)
        return f"data: {data or 'none'}"

    def batches(self, run: Run) -> Iterator[dict]:
        cfg, start = run.cfg, run.start_step
        data_seed = cfg.seed
        if start and cfg.checkpoint.resume_data == "reseed":
            data_seed = make_seed("reseed", cfg.seed, start)
        d = cfg.data
        mv = (
            build_loader(d, "mv", data_seed, run.rank, run.world, extra_views=self.extra_views)
            if d.mv_shards
            else None
        )
        d2 = build_loader(d, "2d", data_seed, run.rank, run.world) if d.shards_2d else None
        # "skip": replay the streams to the exact micro-batch; "reseed": new streams
        skip = start * cfg.gradient_accumulation_steps
        mixer = BatchMixer(mv, d2, p_2d=d.p_2d, seed=data_seed, rank=run.rank,
                           start=skip if cfg.checkpoint.resume_data == "skip" else 0)  # fmt: skip
        return iter(mixer)

    def loss(
        self, run: Run, batch: dict, index: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        captions = drop_captions(batch["caption"], run.cfg, run.rank, index)
        return denoising_loss(run, batch["pixels"], captions, batch["camera"], generator), {}

    def export(self, run: Run) -> dict[str, str]:
        from mvdiff.training.export import export_trained

        # every rank: the whole UNet is gathered (FSDP / ZeRO-3), the main process writes
        parts, folder = run.parts, run.out / "model"
        tower = parts.image_encoder  # an ImageDream model's vision tower goes with it
        export_trained(run.accelerator, run.unet, parts.vae, parts.text_encoder, parts.tokenizer,
                       parts.scheduler, folder,
                       image_encoder=None if tower is None else tower.float(),
                       feature_extractor=parts.feature_extractor)  # fmt: skip
        return {"model": str(folder)}
