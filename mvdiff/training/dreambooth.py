"""MVDreamBooth (docs/design.md §6): personalise a multi-view model from 3-10 photos of a subject.

This is a *task* of the training loop (:class:`mvdiff.training.tasks.DreamBoothTask`, which
:func:`mvdiff.training.trainer.train` runs for a
:class:`~mvdiff.training.config.DreamBoothTrainConfig`): same accelerate setup, optimizer,
checkpoints, resume, logging, validation and export. This module holds the pieces it uses:

* the photos and their checks (:func:`load_photos`, :func:`check_prompt`) and the batches,
  2D mode (``num_views=1``, no camera) with the instance prompt (:class:`DreamBoothBatches`);
* the parameter-preservation term ``lambda * mean(|theta - theta_0|)`` against the starting
  weights (:class:`ParamAnchor`), whose gradient is ``lambda * sign(theta - theta_0) / N``;
* prior preservation: class objects that the *starting* model generates once in multi-view
  mode, cached on disk and reused by later runs (:func:`generate_class_images`,
  :func:`load_class_images`);
* LoRA on the UNet through ``peft`` (:func:`add_lora`); only the adapter is saved
  (:func:`mvdiff.pipelines.loading.save_lora_adapter`).

Everything random in a batch (which photo, crop, flip, which class object) is a function of
``(seed, rank, batch index)``, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mvdiff.data.shards import make_seed
from mvdiff.errors import UserError
from mvdiff.io import write_text
from mvdiff.training.validation import render_views

log = logging.getLogger("mvdiff.dreambooth")

__all__ = [
    "ClassImages",
    "DreamBoothBatches",
    "ParamAnchor",
    "Photo",
    "add_lora",
    "check_prompt",
    "class_cache_folder",
    "class_prompt_from",
    "find_photos",
    "generate_class_images",
    "load_class_images",
    "load_photos",
    "param_preservation",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MASK_TAG = "_mask"

# ---- prompts ------------------------------------------------------------------------------


def _words(text: str) -> list[str]:
    return re.findall(r"[\w'-]+", text.lower())


def check_prompt(prompt: str, identifier: str) -> None:
    """The instance prompt must name the subject with the identifier token, as a word."""
    if not identifier.strip() or len(_words(identifier)) != 1:
        raise UserError(f"--identifier {identifier!r}: must be one word, e.g. 'sks'")
    if not prompt.strip():
        raise UserError("--prompt is required: the instance prompt, e.g. 'a photo of sks dog'")
    if identifier.lower() not in _words(prompt):
        raise UserError(
            f"--prompt {prompt!r} does not contain the identifier {identifier!r}: put it before "
            f"the class word, e.g. 'a photo of {identifier} dog' (or set --identifier)"
        )


def class_prompt_from(prompt: str, identifier: str) -> str:
    """The instance prompt without the identifier: "a photo of sks dog" -> "a photo of dog"."""
    out = re.sub(rf"(?i)(?<![\w'-]){re.escape(identifier)}(?![\w'-])", " ", prompt)
    return " ".join(out.split())


# ---- photos -------------------------------------------------------------------------------


@dataclass
class Photo:
    name: str
    image: object  # PIL RGB image, shorter side == the training resolution


def find_photos(folder: str | Path) -> list[tuple[Path, Path | None]]:
    """``(image, mask or None)`` for every image file in ``folder`` (sorted by name).

    A mask is ``NAME_mask.EXT`` next to ``NAME.EXT`` or ``masks/NAME.*``; white = subject.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--images {folder}: not a folder")
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    masks = {p.stem[: -len(MASK_TAG)]: p for p in files if p.stem.endswith(MASK_TAG)}
    if (folder / "masks").is_dir():
        for p in sorted((folder / "masks").iterdir()):
            if p.suffix.lower() in IMAGE_SUFFIXES:
                masks.setdefault(p.stem, p)
    return [(p, masks.get(p.stem)) for p in files if not p.stem.endswith(MASK_TAG)]


def _open(path: Path, mode: str):
    import PIL.Image
    import PIL.ImageOps

    try:
        with PIL.Image.open(path) as im:
            im = PIL.ImageOps.exif_transpose(im)  # phone photos: apply the EXIF rotation
            return im.convert(mode)
    except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as e:
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise UserError(f"--images: cannot read {path} ({reason})") from None


def load_photos(
    folder: str | Path, resolution: int, min_images: int = 3
) -> tuple[list[Photo], list[str]]:
    """Read, check and resize the subject photos -> ``(photos, warnings)``.

    Errors (one line, naming the file): no folder, fewer than ``min_images`` images, a file
    that is not a readable image, a mask of another size. Warnings: a photo whose shorter side
    is below ``resolution`` (it is upscaled). Masked photos get a white background. Every photo
    is resized so that its shorter side is ``resolution`` (cropping happens per batch).
    """
    import PIL.Image

    found = find_photos(folder)
    if len(found) < min_images:
        names = ", ".join(p.name for p, _ in found) or "none"
        raise UserError(
            f"--images {folder}: {len(found)} image(s) ({names}); MVDreamBooth needs at least "
            f"{min_images} photos of the subject (3-10 work well; jpg/png/webp)"
        )
    photos, warnings = [], []
    for path, mask_path in found:
        image = _open(path, "RGB")
        if mask_path is not None:
            mask = _open(mask_path, "L")
            if mask.size != image.size:
                raise UserError(
                    f"--images: mask {mask_path.name} is {mask.size[0]}x{mask.size[1]} but "
                    f"{path.name} is {image.size[0]}x{image.size[1]}"
                )
            white = PIL.Image.new("RGB", image.size, (255, 255, 255))
            image = PIL.Image.composite(image, white, mask)
        w, h = image.size
        if min(w, h) < resolution:
            warnings.append(
                f"{path.name} is {w}x{h}, smaller than the training resolution {resolution}: "
                "it is upscaled (a blurry photo teaches a blurry subject)"
            )
        scale = resolution / min(w, h)
        size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
        photos.append(Photo(path.name, image.resize(size, PIL.Image.Resampling.LANCZOS)))
    return photos, warnings


# ---- prior preservation: class objects generated once ---------------------------------------


@dataclass
class ClassImages:
    pixels: torch.Tensor  # uint8 [N, V, 3, H, W]
    cameras: torch.Tensor  # float32 [N, V, 16]
    caption: str
    folder: Path


def class_cache_folder(cache_root: str | Path, model_id: str, prompt: str, prior, resolution: int,
                       seed: int) -> Path:  # fmt: skip
    """``cache_root/<prompt>-<hash>``: the hash covers everything that changes the images."""
    key = json.dumps([model_id, prompt, prior.num_views, prior.elevation, prior.steps,
                      prior.guidance_scale, resolution, seed])  # fmt: skip
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40] or "class"
    return Path(cache_root) / f"{slug}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _object_files(folder: Path, i: int) -> tuple[Path, Path]:
    return folder / f"obj-{i:05d}.png", folder / f"obj-{i:05d}.json"


def _complete(folder: Path, i: int) -> bool:
    png, meta = _object_files(folder, i)
    return png.is_file() and meta.is_file()


def generate_class_images(
    folder: Path,
    components,
    prompt: str,
    prior,
    resolution: int,
    seed: int,
    autocast=None,
) -> int:
    """Generate the missing class objects into ``folder`` with the starting model; returns
    how many were generated (0 when the cache is complete).

    Object ``i`` is ``prior.num_views`` views of ``prompt`` at a random azimuth offset, all
    drawn from ``(seed, i)``, so an interrupted generation resumes where it stopped. Each
    object is ``obj-NNNNN.png`` (views side by side) + ``obj-NNNNN.json`` (cameras), written
    under a temporary name and renamed.
    """
    import contextlib

    import PIL.Image
    from tqdm.auto import tqdm

    missing = [i for i in range(prior.num_objects) if not _complete(folder, i)]
    if not missing:
        return 0
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"prompt": prompt, "num_views": prior.num_views, "elevation": prior.elevation,
            "steps": prior.steps, "guidance_scale": prior.guidance_scale,
            "resolution": resolution, "seed": seed}  # fmt: skip
    write_text(folder / "meta.json", json.dumps(meta, indent=1) + "\n")
    unet, vae = components.unet, components.vae
    was_training = unet.training
    unet.eval()
    autocast = autocast or contextlib.nullcontext
    try:
        for i in tqdm(missing, desc="class images", dynamic_ncols=True):
            rng = random.Random(make_seed("prior-object", seed, i))
            azimuth = rng.uniform(0.0, 360.0 / prior.num_views)
            generator = torch.Generator().manual_seed(make_seed("prior-noise", seed, i))
            with autocast():
                images, cameras = render_views(
                    unet, vae, components.text_encoder, components.tokenizer,
                    components.scheduler, prompt, num_views=prior.num_views,
                    elevation=prior.elevation, azimuth_start=azimuth, resolution=resolution,
                    steps=prior.steps, guidance_scale=prior.guidance_scale, generator=generator,
                )  # fmt: skip
            png, info = _object_files(folder, i)
            strip = np.concatenate(list(images), axis=1)  # (V, H, W, 3) -> (H, V*W, 3)
            tmp = png.with_name(png.name + ".tmp")
            PIL.Image.fromarray(strip).save(tmp, format="PNG")
            os.replace(tmp, png)
            record = {"index": i, "prompt": prompt, "azimuth_start": azimuth,
                      "elevation": prior.elevation, "cameras": np.asarray(cameras).tolist()}  # fmt: skip
            write_text(info, json.dumps(record) + "\n")
    finally:
        unet.train(was_training)
    return len(missing)


def load_class_images(folder: Path, num_objects: int, num_views: int, caption: str) -> ClassImages:
    import PIL.Image

    pixels, cameras = [], []
    for i in range(num_objects):
        png, info = _object_files(folder, i)
        if not _complete(folder, i):
            raise UserError(f"class image cache {folder}: {png.name} is missing")
        strip = np.asarray(PIL.Image.open(png).convert("RGB"))  # (H, V*W, 3)
        h, vw, _ = strip.shape
        views = strip.reshape(h, num_views, vw // num_views, 3)  # (H, V*W, 3) -> (H, V, W, 3)
        pixels.append(torch.from_numpy(views.transpose(1, 3, 0, 2).copy()))  # -> (V, 3, H, W)
        cameras.append(torch.tensor(json.loads(info.read_text())["cameras"], dtype=torch.float32))
    return ClassImages(torch.stack(pixels), torch.stack(cameras), caption, folder)


# ---- batches ------------------------------------------------------------------------------


class DreamBoothBatches:
    """Batch ``index`` -> ``{"pixels" uint8 [B, 1, 3, H, W], "camera": None, "caption",
    "prior": None | {"pixels" [Bp, V, 3, H, W], "camera" [Bp, V, 16], "caption"}}``.

    Photos are visited epoch by epoch in a shuffled order (each photo equally often); crop
    and flip and the class objects are drawn per batch. All of it from ``(seed, rank, index)``.
    """

    def __init__(self, photos: list[Photo], caption: str, resolution: int, batch_size: int,
                 crop: str = "center", flip: bool = True, seed: int = 0, rank: int = 0,
                 prior: ClassImages | None = None, prior_batch_size: int = 1, start: int = 0):  # fmt: skip
        self.photos, self.caption, self.resolution = photos, caption, resolution
        self.batch_size, self.crop, self.flip = batch_size, crop, flip
        self.seed, self.rank, self.start = seed, rank, start
        self.prior, self.prior_batch_size = prior, prior_batch_size

    def _photo_index(self, position: int) -> int:
        n = len(self.photos)
        epoch, offset = divmod(position, n)
        order = list(range(n))
        random.Random(make_seed("db-epoch", self.seed, self.rank, epoch)).shuffle(order)
        return order[offset]

    def _pixels(self, photo: Photo, rng: random.Random) -> torch.Tensor:
        image = photo.image
        w, h = image.size
        r = self.resolution
        if self.crop == "random":
            left, top = rng.randint(0, w - r), rng.randint(0, h - r)
        else:
            left, top = (w - r) // 2, (h - r) // 2
        image = image.crop((left, top, left + r, top + r))
        array = np.asarray(image)
        if self.flip and rng.random() < 0.5:
            array = array[:, ::-1]
        return torch.from_numpy(array.transpose(2, 0, 1).copy())  # (H, W, 3) -> (3, H, W)

    def batch(self, index: int) -> dict:
        rng = random.Random(make_seed("db-batch", self.seed, self.rank, index))
        pixels = [
            self._pixels(self.photos[self._photo_index(index * self.batch_size + j)], rng)
            for j in range(self.batch_size)
        ]
        out = {
            "pixels": torch.stack(pixels).unsqueeze(1),  # (B, 3, H, W) -> (B, 1, 3, H, W)
            "camera": None,
            "caption": [self.caption] * self.batch_size,
            "num_views": 1,
            "prior": None,
        }
        if self.prior is not None:
            picks = [rng.randrange(len(self.prior.pixels)) for _ in range(self.prior_batch_size)]
            out["prior"] = {
                "pixels": self.prior.pixels[picks],  # (Bp, V, 3, H, W)
                "camera": self.prior.cameras[picks],  # (Bp, V, 16)
                "caption": [self.prior.caption] * len(picks),
            }
        return out

    def __iter__(self):
        index = self.start
        while True:
            yield self.batch(index)
            index += 1


# ---- parameter preservation ---------------------------------------------------------------


class _AbsDiffSum(torch.autograd.Function):
    """``sum(|p - p0|)`` whose backward recomputes ``sign(p - p0)`` instead of keeping a copy
    of ``p - p0`` alive until the backward pass (a whole extra model for a full fine-tune)."""

    @staticmethod
    def forward(ctx, param, anchor):
        ctx.save_for_backward(param, anchor)
        return (param.detach().float() - anchor.float()).abs().sum()

    @staticmethod
    def backward(ctx, grad):
        param, anchor = ctx.saved_tensors
        return (grad * torch.sign(param.detach().float() - anchor.float())).to(param.dtype), None


def param_preservation(params, anchors, lam: float) -> torch.Tensor:
    """``lam * mean(|theta - theta_0|)`` over all elements of ``params``; gradient
    ``lam * sign(theta - theta_0) / N`` (0 where equal), N = total number of elements."""
    params, anchors = list(params), list(anchors)
    n = sum(p.numel() for p in params)
    total = sum(_AbsDiffSum.apply(p, a) for p, a in zip(params, anchors, strict=True))
    return total * (lam / n)


class ParamAnchor:
    """theta_0: a frozen float32 copy of the trainable parameters taken at the start (before a
    resume loads later weights), for :func:`param_preservation`."""

    def __init__(self, params):
        self.params = [p for p in params if p.requires_grad]
        self.anchors = [p.detach().float().clone() for p in self.params]
        self.numel = sum(p.numel() for p in self.params)

    def loss(self, lam: float) -> torch.Tensor:
        return param_preservation(self.params, self.anchors, lam)

    @torch.no_grad()
    def distance(self) -> float:
        """mean(|theta - theta_0|), for the logs."""
        total = sum(float((p.float() - a).abs().sum()) for p, a in zip(self.params, self.anchors))
        return total / max(1, self.numel)


# ---- LoRA ---------------------------------------------------------------------------------


def add_lora(unet, settings):
    """Freeze the UNet and add peft LoRA layers (rank, alpha, target modules from
    ``settings``); returns the ``peft.LoraConfig``. Only the LoRA weights train."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        target_modules=list(settings.target_modules),
        init_lora_weights=True,  # B = 0: the model starts exactly as the base
    )
    unet.requires_grad_(False)
    try:
        inject_adapter_in_model(config, unet)
    except ValueError as e:
        raise UserError(
            f"dreambooth.lora.target_modules {list(settings.target_modules)}: "
            f"{str(e).splitlines()[0][:200]}"
        ) from None
    check_lora_gradients(unet)
    return config


def lora_parameters(unet) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in unet.named_parameters() if "lora_" in n and p.requires_grad}


def check_lora_gradients(unet) -> None:
    """Every LoRA weight must get a gradient from the UNet's output in the 2D mode DreamBooth
    trains in. One that gets none sits on a layer that mode bypasses (e.g. the camera MLP, or
    a processor that reads ``.weight`` instead of calling the layer) and would silently never
    train: an error naming the layers. One small forward/backward (8x8 latents)."""
    params = list(unet.parameters())
    device, dtype = params[0].device, params[0].dtype
    width = unet.config.cross_attention_dim
    width = width[0] if isinstance(width, (list, tuple)) else width
    lora = lora_parameters(unet)
    for p in lora.values():
        p.grad = None
    gen = torch.Generator().manual_seed(0)  # the caller's global RNG is left alone
    x = torch.randn(1, unet.config.in_channels, 8, 8, generator=gen).to(device, dtype)
    text = torch.randn(1, 4, width, generator=gen).to(device, dtype)
    t = torch.tensor([500], device=device)
    unet(x, t, text, camera=None, num_views=1).sample.float().square().mean().backward()
    dead = sorted({n.split(".lora_")[0] for n, p in lora.items() if p.grad is None})
    for p in lora.values():
        p.grad = None
    if dead:
        raise UserError(
            f"LoRA layers that never get a gradient (the model bypasses them): {dead[:4]}"
            f"{' ...' if len(dead) > 4 else ''}; remove them from dreambooth.lora.target_modules"
        )


# ---- glue for the training loop -------------------------------------------------------------


def check_inputs(cfg) -> tuple[list[Photo], list[str]]:
    """Everything about the inputs that can be checked before any model is loaded (one-line
    errors); returns the photos and the warnings to print."""
    db = cfg.dreambooth
    if cfg.data.mv_shards or cfg.data.shards_2d:
        raise UserError("dreambooth trains on --images only: leave data.mv_shards/shards_2d empty")
    if not db.images:
        raise UserError("--images is required: a folder of 3-10 photos of the subject")
    check_prompt(db.prompt, db.identifier)
    if db.prior.enabled:
        if db.prior.num_objects < 1 or db.prior.batch_size < 1 or db.prior.num_views < 1:
            raise UserError("dreambooth.prior: num_objects, batch_size and num_views must be >= 1")
        if not class_prompt_from(db.prompt, db.identifier) and not db.prior.class_prompt:
            raise UserError("dreambooth.prior.class_prompt is empty (and the prompt is only the "
                            "identifier)")  # fmt: skip
    if db.param_preservation < 0:
        raise UserError(f"dreambooth.param_preservation must be >= 0, got {db.param_preservation}")
    if cfg.data.batch_size < 1:
        raise UserError(f"data.batch_size must be >= 1, got {cfg.data.batch_size}")
    return load_photos(db.images, cfg.data.resolution, db.min_images)


def _model_id(pretrained: str) -> str:
    """What identifies the starting model for the class-image cache."""
    from mvdiff.pipelines.loading import fingerprint

    path = Path(pretrained).expanduser()
    if path.is_dir():
        return f"{path.resolve()}:{fingerprint(path)}"
    if path.is_file():
        st = path.stat()
        return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    return pretrained


def class_images_for(cfg, components, accelerator, out: Path) -> tuple[ClassImages, int]:
    """Class objects for prior preservation: generated by the main process with the starting
    model if the cache lacks them, then read by every process. ``(images, generated)``."""
    db = cfg.dreambooth
    prompt = (db.prior.class_prompt or class_prompt_from(db.prompt, db.identifier)).strip()
    caption = prompt + db.prior.prompt_suffix
    root = Path(db.prior.cache_dir).expanduser() if db.prior.cache_dir else out / "class_images"
    folder = class_cache_folder(root, _model_id(cfg.model.pretrained), caption, db.prior,
                                cfg.data.resolution, cfg.seed)  # fmt: skip
    generated = 0
    if accelerator.is_main_process:
        generated = generate_class_images(folder, components, caption, db.prior,
                                          cfg.data.resolution, cfg.seed,
                                          autocast=accelerator.autocast)  # fmt: skip
        if generated:
            log.info("generated %d class objects of %r in %s", generated, caption, folder)
        else:
            log.info("reusing %d cached class objects of %r in %s", db.prior.num_objects,
                     caption, folder)  # fmt: skip
    accelerator.wait_for_everyone()
    images = load_class_images(folder, db.prior.num_objects, db.prior.num_views, caption)
    return images, generated


def adapter_meta(cfg) -> dict:
    """What ``mvdiff_adapter.json`` records: the base model (an absolute path when it is one)
    and its fingerprint, the prompt and the identifier."""
    from mvdiff.pipelines.loading import fingerprint

    db = cfg.dreambooth
    base = cfg.model.pretrained
    path = Path(base).expanduser()
    meta = {"base_model": str(path.resolve()) if path.exists() else base}
    if path.is_dir():
        meta["base_fingerprint"] = fingerprint(path)
    meta.update(prompt=db.prompt, identifier=db.identifier, rank=db.lora.rank,
                alpha=db.lora.alpha, steps=cfg.max_steps)  # fmt: skip
    return meta
