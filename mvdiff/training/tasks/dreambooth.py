"""MVDreamBooth (docs/design.md §6) as a task: the batches are the subject's photos (2D mode)
with optional class objects; the loss adds prior preservation and parameter preservation; LoRA
optionally replaces full fine-tuning, and the result is the adapter or the model folder.
The pieces (photos, class images, anchors, LoRA) live in :mod:`mvdiff.training.dreambooth`."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch

from mvdiff.training import dreambooth as dbm
from mvdiff.training.tasks.base import Run, denoising_loss
from mvdiff.training.tasks.joint import JointTask

log = logging.getLogger("mvdiff.train")

__all__ = ["DreamBoothTask"]


class DreamBoothTask(JointTask):
    """Needs a :class:`~mvdiff.training.config.DreamBoothTrainConfig` (``cfg.dreambooth``)."""

    terms = ("instance_loss", "prior_loss", "preservation")

    def __init__(self):
        self.photos: list[dbm.Photo] = []
        self.class_images: dbm.ClassImages | None = None
        self.class_generated = 0
        self.lora_config = None
        self.anchor: dbm.ParamAnchor | None = None

    def check(self, cfg) -> list[str]:
        self.photos, warnings = dbm.check_inputs(cfg)
        return [f"--images: {w}" for w in warnings]

    def describe(self, cfg) -> str:
        db, on = cfg.dreambooth, {True: "on", False: "off"}
        return (
            f"photos {db.images}, prompt {db.prompt!r}, LoRA {on[db.lora.enabled]}, "
            f"prior {on[db.prior.enabled]}"
        )

    def base_lr(self, cfg) -> float:
        """``dreambooth.lora.lr`` when training a LoRA adapter, else ``optim.lr``."""
        lora = cfg.dreambooth.lora
        return lora.lr if lora.enabled else cfg.optim.lr

    def setup(self, run: Run) -> None:
        db = run.cfg.dreambooth
        if db.prior.enabled:
            # class objects from the *starting* model, generated once (main process), cached
            run.parts.unet.to(run.device)
            self.class_images, self.class_generated = dbm.class_images_for(
                run.cfg, run.parts, run.accelerator, run.out
            )
        if db.lora.enabled:
            self.lora_config = dbm.add_lora(run.parts.unet, db.lora)

    def start(self, run: Run) -> None:
        # theta_0 of the parameter-preservation term: the starting weights (before a resume)
        if run.cfg.dreambooth.param_preservation > 0:
            self.anchor = dbm.ParamAnchor(run.trainable)

    def batches(self, run: Run) -> Iterator[dict]:
        # photos (2D) + class objects: batch i is a pure function of (seed, rank, i)
        cfg, db = run.cfg, run.cfg.dreambooth
        return iter(dbm.DreamBoothBatches(
            self.photos, db.prompt, cfg.data.resolution, cfg.data.batch_size, crop=db.crop,
            flip=db.flip, seed=cfg.seed, rank=run.rank, prior=self.class_images,
            prior_batch_size=db.prior.batch_size,
            start=run.start_step * cfg.gradient_accumulation_steps,
        ))  # fmt: skip

    def loss(
        self, run: Run, batch: dict, index: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        db = run.cfg.dreambooth
        loss, _ = super().loss(run, batch, index, generator)
        terms = {"instance_loss": loss.detach()}
        prior = batch.get("prior")
        if prior is not None:  # class objects, multi-view with cameras
            prior_loss = denoising_loss(run, prior["pixels"], prior["caption"], prior["camera"],
                                        generator)  # fmt: skip
            terms["prior_loss"] = prior_loss.detach()
            loss = loss + db.prior.weight * prior_loss
        if self.anchor is not None:  # lambda * mean(|theta - theta_0|)
            preservation = self.anchor.loss(db.param_preservation)
            terms["preservation"] = preservation.detach()
            loss = loss + preservation
        return loss, terms

    def log_values(self, run: Run) -> dict[str, float]:
        if self.anchor is None:
            return {}
        return {"theta_distance": self.anchor.distance()}  # mean(|theta - theta_0|)

    def validation_prompts(self, cfg) -> list[str]:
        db = cfg.dreambooth
        return list(cfg.validation.prompts) or [db.prompt + db.validation_suffix]  # 4 views

    def summary(self, run: Run) -> dict:
        out = {"class_images_generated": self.class_generated}
        if self.class_images is not None:
            out["class_images"] = str(self.class_images.folder)
        return out

    def export(self, run: Run) -> dict[str, str]:
        if self.lora_config is None:
            return super().export(run)
        from mvdiff.pipelines.loading import save_lora_adapter

        # only the adapter; it records its base model (LoRA trains under DDP, not FSDP)
        folder = run.out / "adapter"
        if run.accelerator.is_main_process:
            save_lora_adapter(run.model, self.lora_config, folder, dbm.adapter_meta(run.cfg))
        run.accelerator.wait_for_everyone()
        return {"adapter": str(folder)}
