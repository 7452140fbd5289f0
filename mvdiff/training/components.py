"""Load the parts of a training run: multi-view UNet, frozen VAE and text encoder, tokenizer,
noise schedule.

``pretrained`` is a diffusers folder (``model_index.json`` + ``unet/ vae/ text_encoder/
tokenizer/ scheduler/``) of either

* plain Stable Diffusion (2.1-base, 1.5): its UNet gets a zero-initialised camera MLP
  (:func:`mvdiff.models.add_camera_mlp`), so training starts from exactly the 2D model; or
* a multi-view model (its ``unet/config.json`` has ``class_embed_type: projection``);

or ``"tiny"`` for :func:`mvdiff.testing.tiny_components` (tests, quickstart, benchmarks), or an
official checkpoint file (``.pt`` ...), converted once into the cache (as ``mvdiff sample``).
Weights are read from safetensors (or ``torch.load(weights_only=True)`` for ``.bin``, by
diffusers / transformers): a ``.bin`` holding anything but tensors, a truncated or foreign
weights file or a broken ``config.json`` is a one-line :class:`~mvdiff.errors.UserError`
naming the folder, never unpickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mvdiff.errors import UserError

__all__ = ["Components", "load_components", "noise_scheduler_from"]


@dataclass
class Components:
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any  # the sampling scheduler shipped with the model (exported as is)
    source: str  # "sd" (camera MLP added), "multiview" or "tiny"
    #: an ImageDream folder's vision tower (CLIPVisionModel) and its CLIPImageProcessor
    #: (exported with the model), else None
    image_encoder: Any = None
    feature_extractor: Any = None


def _require(folder: Path, sub: str) -> Path:
    path = folder / sub
    if not path.is_dir():
        raise UserError(f"model.pretrained={folder}: missing {sub}/ (expected a diffusers folder)")
    return path


def _load(pretrained: str, sub: str, load, *args):
    """``load(*args)``; any failure to read the weights or config -> one line naming them."""
    try:
        return load(*args)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - diffusers/transformers/safetensors/pickle errors
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        text = lines[0][:300] if lines else ""
        raise UserError(
            f"model.pretrained={pretrained}: cannot load {sub}/ ({type(e).__name__}: {text}); "
            "weights must be safetensors or a .bin of plain tensors"
        ) from None


def load_components(pretrained: str, vae_dtype=None) -> Components:
    """Components from a diffusers folder or ``"tiny"`` (see module docstring); the VAE in
    ``vae_dtype`` (default float32), set at load time: diffusers logs a warning on any
    ``vae.to(dtype)``, even one with nothing to keep in float32."""
    if pretrained == "tiny":
        from mvdiff.testing import tiny_components

        parts = tiny_components(seed=0)  # float32
        if vae_dtype is not None and vae_dtype != parts["vae"].dtype:
            parts["vae"] = parts["vae"].to(dtype=vae_dtype)
        return Components(**parts, source="tiny")
    if not pretrained:
        raise UserError("model.pretrained is empty: give a diffusers model folder or 'tiny'")
    folder = Path(pretrained).expanduser()
    if folder.is_file():
        from mvdiff.pipelines.loading import CHECKPOINT_SUFFIXES, converted_folder

        if folder.suffix not in CHECKPOINT_SUFFIXES:
            raise UserError(
                f"model.pretrained={pretrained}: not a folder or an official checkpoint"
            )
        folder = converted_folder(folder, log=lambda msg: print(msg, flush=True))
    if not folder.is_dir():
        raise UserError(f"model.pretrained={pretrained}: not a directory")
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from mvdiff.models import MultiViewUNet2DConditionModel, add_camera_mlp

    unet_dir = _require(folder, "unet")
    config = _load(pretrained, "unet", lambda: json.loads((unet_dir / "config.json").read_text()))
    if isinstance(config, dict) and config.get("class_embed_type") == "projection":
        unet = _load(pretrained, "unet", MultiViewUNet2DConditionModel.from_pretrained, unet_dir)
        source = "multiview"
    else:
        unet = _load(pretrained, "unet", UNet2DConditionModel.from_pretrained, unet_dir)
        unet = add_camera_mlp(unet)
        source = "sd"
    from mvdiff.pipelines.loading import dtype_kwargs

    vae_dir = _require(folder, "vae")
    vae = _load(pretrained, "vae", lambda: AutoencoderKL.from_pretrained(
        vae_dir, **dtype_kwargs(vae_dtype or torch.float32)))  # fmt: skip
    text_encoder = _load(pretrained, "text_encoder", CLIPTextModel.from_pretrained,
                         _require(folder, "text_encoder"))  # fmt: skip
    tokenizer = _load(pretrained, "tokenizer", CLIPTokenizer.from_pretrained,
                      _require(folder, "tokenizer"))  # fmt: skip
    sched_dir = folder / "scheduler"
    scheduler = (
        _load(pretrained, "scheduler", DDIMScheduler.from_pretrained, sched_dir)
        if sched_dir.is_dir()
        else DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        )
    )
    image_encoder = feature_extractor = None
    if (folder / "image_encoder").is_dir() and (folder / "feature_extractor").is_dir():
        from transformers import CLIPImageProcessor, CLIPVisionModel

        image_encoder = _load(pretrained, "image_encoder", CLIPVisionModel.from_pretrained,
                              folder / "image_encoder")  # fmt: skip
        feature_extractor = _load(pretrained, "feature_extractor",
                                  CLIPImageProcessor.from_pretrained,
                                  folder / "feature_extractor")  # fmt: skip
    return Components(unet, vae, text_encoder, tokenizer, scheduler, source, image_encoder,
                      feature_extractor)  # fmt: skip


def noise_scheduler_from(scheduler) -> Any:
    """The training noise schedule (DDPM) with the same betas as the model's scheduler."""
    from diffusers import DDPMScheduler

    config = {
        k: v
        for k, v in dict(scheduler.config).items()
        if k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
    }
    return DDPMScheduler(**config, prediction_type="epsilon")


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    module.requires_grad_(False)
    return module.eval()
