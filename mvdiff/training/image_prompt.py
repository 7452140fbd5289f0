"""Training the image-conditioned (ImageDream) mode from the same shards (config ``image``).

ImageDream released inference only; this is the recipe its paper and the official forward
describe, on the pieces of this repository:

* **Reference view.** Each object's image prompt is one of its own renders:
  ``image.reference=extra`` draws a rendered view that is not among the ``data.num_views``
  targets (the loader decodes one more view, :class:`~mvdiff.data.multiview.MultiViewDecoder`
  ``extra_views``), ``target`` picks one of the targets (seeded by step, rank and object).
  2D batches are conditioned on themselves: the image is its own prompt (image tokens only;
  a one-view batch has no frame to put a reference latent next to).
* **Image tokens** come from the frozen vision tower (``CLIPVisionModel`` + its
  ``CLIPImageProcessor``, the penultimate hidden states, as ``MVDreamPipeline.encode_image``),
  **the reference latent** from the frozen VAE (a posterior sample, scaled): with
  ``image.reference_frame`` (ImageDream's "pixel" mode, ``ipmv``) it is written into an extra,
  last, zero-camera frame of every object by the UNet and the loss covers the targets only.
* **Classifier-free guidance drops**, per object, from a generator seeded by
  ``(seed, rank, step, object)``: the caption (``caption_dropout``, as text training), the
  image (``image.drop_image``: zero image embeddings *and* zero reference latent, the official
  unconditional input), the reference latent alone (``image.drop_reference``) and everything
  at once (``image.drop_all``: empty caption, zero image, zero reference — what the
  unconditional half of sampling feeds).
* **Start.** An ImageDream folder (its UNet has ``num_image_tokens``; its ``image_encoder/``
  and ``feature_extractor/`` are the tower) or an MVDream / SD folder, whose UNet gets the
  image prompt by :func:`add_image_prompt`: a new IP-Adapter-Plus resampler (diffusers'
  default initialisation) and ``to_k_ip`` / ``to_v_ip`` in every cross-attention,
  initialised as copies of that layer's ``to_k`` / ``to_v`` (``image.init_ip=copy``, the
  default). That is IP-Adapter's initialisation (its training scripts load ``to_k_ip`` /
  ``to_v_ip`` from the UNet's ``to_k`` / ``to_v``), which ImageDream's decoupled
  cross-attention follows: the image branch starts as a working attention over the image
  tokens, so the resampler gets a gradient from the first step. ``init_ip=zero`` zeroes
  them instead: the model starts as exactly the MVDream model (the image branch adds 0), but
  the resampler's gradient is then 0 until ``to_v_ip`` has moved away from zero.

The task of the training loop is :class:`mvdiff.training.tasks.image.ImageTask`; the pieces
here are usable on their own (tests).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch

from mvdiff.data.shards import make_seed
from mvdiff.errors import UserError

log = logging.getLogger("mvdiff.train")

__all__ = [
    "ImagePromptConfig",
    "add_image_prompt",
    "draw_drops",
    "encode_reference",
    "load_image_encoder",
    "split_reference",
]


@dataclass
class ImagePromptConfig:
    """Config section ``image`` of training (see the module docstring)."""

    #: train the image-conditioned mode (ImageDream): image tokens + reference frame
    enabled: bool = False
    #: the vision tower: "" = the model folder's image_encoder/ + feature_extractor/ (an
    #: ImageDream folder), "tiny" = mvdiff.testing.tiny_image_encoder, or a folder holding
    #: image_encoder/ (CLIPVisionModel) and feature_extractor/ (CLIPImageProcessor)
    encoder: str = ""
    #: image tokens of the resampler added to a UNet without an image prompt (ImageDream: 16)
    num_tokens: int = 16
    #: to_k_ip / to_v_ip of a new image prompt: copies of to_k / to_v (IP-Adapter) or zero
    init_ip: Literal["copy", "zero"] = "copy"
    #: the image prompt of an object: "extra" = a render not among the targets, "target" =
    #: one of the targets
    reference: Literal["extra", "target"] = "extra"
    #: the reference latent as an extra zero-camera frame (ImageDream's "pixel" mode);
    #: false = image tokens only ("local" mode)
    reference_frame: bool = True
    #: per object: zero image embeddings and reference latent (the official uncond)
    drop_image: float = 0.1
    #: per object: zero reference latent only
    drop_reference: float = 0.0
    #: per object: empty caption, zero image, zero reference together
    drop_all: float = 0.05

    LIMITS: ClassVar[dict] = {"num_tokens": ">=1", "drop_image": "[0,1]",
                              "drop_reference": "[0,1]", "drop_all": "[0,1]"}  # fmt: skip


# ---- model ------------------------------------------------------------------------------------


def add_image_prompt(unet, num_image_tokens: int, image_embed_dim: int, init_ip: str = "copy"):
    """An image-prompt UNet from a multi-view one without: the same weights plus a new
    resampler and ``to_k_ip`` / ``to_v_ip`` (copies of ``to_k`` / ``to_v``, or zero)."""
    from mvdiff.models import MultiViewUNet2DConditionModel

    if init_ip not in ("copy", "zero"):
        raise UserError(f"image.init_ip must be copy or zero, got {init_ip!r}")
    config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    config.update(num_image_tokens=num_image_tokens, image_embed_dim=image_embed_dim)
    model = MultiViewUNet2DConditionModel.from_config(config)
    missing, unexpected = model.load_state_dict(unet.state_dict(), strict=False)
    new = [k for k in missing if not (k.startswith("image_proj.") or "_ip." in k)]
    if unexpected or new:
        raise ValueError(f"state dicts disagree: missing={new} unexpected={unexpected}")
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "to_k_ip", None) is None:
                continue
            for name in ("to_k", "to_v"):
                ip = getattr(module, f"{name}_ip").weight
                if init_ip == "copy":
                    ip.copy_(getattr(module, name).weight)
                else:
                    ip.zero_()
    model = model.to(device=unet.device)
    return model if model.dtype == unet.dtype else model.to(dtype=unet.dtype)


def load_image_encoder(encoder: str, pretrained: str):
    """``(CLIPVisionModel, CLIPImageProcessor)`` named by ``image.encoder`` (see the config)."""
    spec = encoder or pretrained
    if spec == "tiny":
        from mvdiff.testing import tiny_image_encoder

        return tiny_image_encoder(3)  # the tower of mvdiff.testing.tiny_image_components(0)
    key = "image.encoder" if encoder else "model.pretrained"
    folder = Path(spec).expanduser()
    missing = [s for s in ("image_encoder", "feature_extractor") if not (folder / s).is_dir()]
    if missing:
        raise UserError(
            f"{key}={spec}: no {' / '.join(s + '/' for s in missing)} (the image mode needs a "
            "vision tower: an ImageDream folder, or set image.encoder to one)"
        )
    from transformers import CLIPImageProcessor, CLIPVisionModel

    try:
        model = CLIPVisionModel.from_pretrained(folder / "image_encoder")
        processor = CLIPImageProcessor.from_pretrained(folder / "feature_extractor")
    except Exception as e:  # noqa: BLE001 - transformers / safetensors errors: bad input
        text = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise UserError(f"{key}={spec}: cannot load the vision tower ({text})") from None
    return model, processor


# ---- data -------------------------------------------------------------------------------------


def split_reference(batch: dict, num_views: int, mode: str, seed: int, rank: int, index: int):
    """``batch`` with ``pixels`` / ``camera`` cut to the ``num_views`` targets, plus
    ``reference`` uint8 ``[B, 3, H, W]``: the extra last view (``extra``), one of the targets
    (``target``, drawn per object from ``(seed, rank, index, object)``) or, for a 2D batch, the
    image itself."""
    pixels, camera = batch["pixels"], batch["camera"]
    b, v = pixels.shape[:2]
    if camera is None:  # 2D: conditioned on itself
        return {**batch, "reference": pixels[:, 0]}
    if mode == "extra":
        if v != num_views + 1:
            raise ValueError(f"expected {num_views} targets + 1 reference view, got {v} views")
        return {**batch, "pixels": pixels[:, :num_views], "camera": camera[:, :num_views],
                "num_views": num_views, "reference": pixels[:, num_views]}  # fmt: skip
    picks = [
        random.Random(make_seed("reference", seed, rank, index, i)).randrange(v) for i in range(b)
    ]
    return {**batch, "reference": pixels[torch.arange(b), torch.tensor(picks)]}


def draw_drops(cfg: ImagePromptConfig, b: int, seed: int, rank: int, index: int) -> dict:
    """Per object: ``text`` (forced empty caption), ``image`` (zero image embeddings and
    reference latent), ``reference`` (zero reference latent) — lists of ``b`` bools."""
    text, image, reference = [], [], []
    for i in range(b):
        rng = random.Random(make_seed("image-drop", seed, rank, index, i))
        every, img, ref = (rng.random() < p for p in (cfg.drop_all, cfg.drop_image,
                                                      cfg.drop_reference))  # fmt: skip
        text.append(every)
        image.append(every or img)
        reference.append(every or img or ref)
    return {"text": text, "image": image, "reference": reference}


@torch.no_grad()
def encode_reference(image_encoder, processor, vae, pixels: torch.Tensor, generator,
                     latents: bool = True):  # fmt: skip
    """uint8 ``[B, 3, H, W]`` -> (image embeddings ``[B, N, E]``: the tower's penultimate
    hidden states after its processor, reference latents ``[B, 4, h, w]`` or None)."""
    from PIL import Image

    from mvdiff.training.loss import encode_images

    arrays = pixels.permute(0, 2, 3, 1).cpu().numpy()  # (B, 3, H, W) -> (B, H, W, 3)
    images = [Image.fromarray(np.ascontiguousarray(a)) for a in arrays]
    values = processor(images=images, return_tensors="pt").pixel_values
    values = values.to(image_encoder.device, image_encoder.dtype)
    hidden = image_encoder(values, output_hidden_states=True).hidden_states
    embeds = hidden[-2].float()  # (B, N, E), before the post-layernorm
    ref = encode_images(vae, pixels[:, None], generator) if latents else None  # (B, 4, h, w)
    return embeds, ref
