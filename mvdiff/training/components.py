"""Load the parts of a training run: multi-view UNet, frozen VAE and text encoder, tokenizer,
noise schedule.

``pretrained`` is a diffusers folder (``model_index.json`` + ``unet/ vae/ text_encoder/
tokenizer/ scheduler/``) of either

* plain Stable Diffusion (2.1-base, 1.5): its UNet gets a zero-initialised camera MLP
  (:func:`mvdiff.models.add_camera_mlp`), so training starts from exactly the 2D model; or
* a multi-view model (its ``unet/config.json`` has ``class_embed_type: projection``);

or ``"tiny"`` for :func:`mvdiff.testing.tiny_components` (tests, quickstart, benchmarks), or an
official checkpoint file (``.pt`` ...), converted once into the cache (as ``mvdiff sample``).
``vae/`` is an ``AutoencoderKL`` or, when its ``config.json`` names it, the pixel-space
:class:`~mvdiff.models.pixel_vae.PixelUnshuffleAutoencoder`.

Weights are read from safetensors (or ``torch.load(weights_only=True)`` for ``.bin``, by
diffusers / transformers): a ``.bin`` holding anything but tensors, a truncated or foreign
weights file or a broken ``config.json`` is a one-line :class:`~mvdiff.errors.UserError`
naming the folder, never unpickled.

The ablation switches of ``model`` (:func:`configure_unet`) are applied to the loaded UNet:
``camera: false`` removes the camera MLP (or does not add one), ``attention: per_view`` sets
the UNet's ``view_attention`` so its self-attention stays within each view; both are part of
the UNet's config, so the exported folder samples with the same model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mvdiff.errors import UserError

__all__ = [
    "Components",
    "configure_unet",
    "load_components",
    "noise_scheduler_from",
    "sampling_scheduler",
]


@dataclass
class Components:
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any  # the sampling scheduler shipped with the model (exported as is)
    source: str  # "sd" (camera MLP added), "multiview" or "tiny"


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


def load_components(
    pretrained: str, vae_dtype=None, camera: bool = True, attention: str = "joint"
) -> Components:
    """Components from a diffusers folder or ``"tiny"`` (see module docstring); the VAE in
    ``vae_dtype`` (default float32), set at load time: diffusers logs a warning on any
    ``vae.to(dtype)``, even one with nothing to keep in float32. ``camera`` / ``attention``:
    :func:`configure_unet`."""
    parts = _load_components(pretrained, vae_dtype)
    parts.unet = configure_unet(parts.unet, camera=camera, attention=attention)
    return parts


def configure_unet(unet, camera: bool = True, attention: str = "joint"):
    """``unet`` with a camera MLP or none (``camera``; an added one starts at zero, a removed
    one takes its weights with it) and ``view_attention = attention`` ("joint" or
    "per_view"); the other weights unchanged."""
    from mvdiff.models import add_camera_mlp, remove_camera_mlp

    if camera and unet.class_embedding is None:
        unet = add_camera_mlp(unet)
    elif not camera and unet.class_embedding is not None:
        unet = remove_camera_mlp(unet)
    if unet.config.view_attention != attention:
        unet.register_to_config(view_attention=attention)
    return unet


def _load_components(pretrained: str, vae_dtype) -> Components:
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
    if isinstance(config, dict) and (
        config.get("class_embed_type") == "projection"
        or config.get("_class_name") == MultiViewUNet2DConditionModel.__name__  # camera: false
    ):
        unet = _load(pretrained, "unet", MultiViewUNet2DConditionModel.from_pretrained, unet_dir)
        source = "multiview"
    else:
        unet = _load(pretrained, "unet", UNet2DConditionModel.from_pretrained, unet_dir)
        unet = add_camera_mlp(unet)
        source = "sd"
    from mvdiff.pipelines.loading import dtype_kwargs

    vae_dir = _require(folder, "vae")
    vae_class = AutoencoderKL
    vae_config = _load(pretrained, "vae", lambda: json.loads((vae_dir / "config.json").read_text()))
    if (
        isinstance(vae_config, dict)
        and vae_config.get("_class_name") == "PixelUnshuffleAutoencoder"
    ):
        from mvdiff.models.pixel_vae import PixelUnshuffleAutoencoder as vae_class
    vae = _load(pretrained, "vae", lambda: vae_class.from_pretrained(
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
    return Components(unet, vae, text_encoder, tokenizer, scheduler, source)


def noise_scheduler_from(scheduler, prediction_type: str = "epsilon") -> Any:
    """The training noise schedule (DDPM) with the same betas as the model's scheduler, and
    the model's output ``prediction_type`` ("epsilon", "v_prediction" or "sample", as
    diffusers' schedulers name it)."""
    from diffusers import DDPMScheduler

    config = {
        k: v
        for k, v in dict(scheduler.config).items()
        if k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
    }
    return DDPMScheduler(**config, prediction_type=prediction_type)


def sampling_scheduler(scheduler, prediction_type: str) -> Any:
    """The model's sampling scheduler set to ``prediction_type`` (what training taught the
    UNet to output): exported with the model, so that the pipeline samples correctly."""
    if scheduler.config.get("prediction_type") == prediction_type:
        return scheduler
    return type(scheduler).from_config(scheduler.config, prediction_type=prediction_type)


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    module.requires_grad_(False)
    return module.eval()
