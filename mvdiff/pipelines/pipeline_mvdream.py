"""MVDreamPipeline: a text prompt -> V consistent views of one object (docs/design.md §5, §9).

The sampling loop, in the order it runs::

    text   = text_encoder(prompt + ", 3d asset"), text_encoder(negative_prompt or "")
    camera = get_camera(V, elevation, azimuth_start, azimuth_span)       # [V, 16]
    x_T    ~ N(0, I)                                                     # [B*V, 4, H/8, W/8]
    for t in scheduler.timesteps:
        eps_uncond, eps_cond = unet([x_t, x_t], t, [uncond, cond], [camera, camera]).chunk(2)
        eps = eps_uncond + s * (eps_cond - eps_uncond)        (optionally CFG-rescaled)
        x_{t-1} = scheduler.step(eps, t, x_t)
    images = vae.decode(x_0 / scaling_factor), one view at a time

Batch layout: rows are ``(object, view)`` with the V views of an object contiguous; with
classifier-free guidance the UNet sees ``[uncond views of all objects, cond views of all
objects]`` (2*B*V rows) and both halves carry the same cameras — exactly the official
MVDream sampler. ``num_views=1`` without cameras is plain 2D Stable Diffusion (the camera MLP
is skipped).

Image prompt (ImageDream folders: a UNet with ``num_image_tokens`` plus ``image_encoder`` and
``feature_extractor``): ``image=`` adds the photo's OpenCLIP penultimate hidden states as
image tokens and, by default, a reference frame: every object gets a fifth view whose latent
is the photo's (VAE-encoded, resized to the output size) and whose camera is the zero vector
(official ``get_camera(V, extra_view=True)``). The unconditional half of CFG gets the
negative text, all-zero image embeddings and an all-zero reference latent, exactly as the
official sampler. The reference frame is dropped from the outputs.

Latents and scheduler arithmetic stay in float32; the UNet, text encoder and VAE run in
their own dtype (``pipe.to(torch.bfloat16)``), so half precision only touches the networks.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from mvdiff.cameras import get_camera
from mvdiff.errors import UserError
from mvdiff.pipelines import folders
from mvdiff.prompts import CAPTION_SUFFIX

#: Appended to every prompt by default, as in the official MVDream script and training.
DEFAULT_PROMPT_SUFFIX = CAPTION_SUFFIX
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
#: the warning for ``pipe.winograd_decode = ...`` (the option is gone; kept for one release)
WINOGRAD_REMOVED = (
    "MVDreamPipeline.winograd_decode was removed (the NNPACK Winograd VAE decode called a "
    "private PyTorch op); setting it has no effect, the VAE decodes with PyTorch's own "
    "convolutions - delete the assignment"
)

#: For ``DiffusionPipeline.from_pretrained(folder, custom_pipeline=ENTRY_FILE, trust_remote_code=True)``
#: on folders written before mvdiff shipped its code in them (``mvdiff.pipelines.folders``).
ENTRY_FILE = str(Path(__file__).with_name("diffusers_entry.py"))


@dataclass
class MVDreamPipelineOutput(BaseOutput):
    """``images``: B*V views, object-major (list of PIL images, ``np`` ``[B*V, H, W, 3]`` or
    ``pt`` ``[B*V, 3, H, W]`` in [0, 1], or latents ``[B*V, 4, h, w]``); ``cameras``: the
    ``[B*V, 16]`` camera vectors used (None in 2D mode); ``input_images``: with ``image=``,
    the RGB images the model was conditioned on (one per prompt, alpha composited)."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    cameras: torch.Tensor | None = None
    input_images: list[PIL.Image.Image] | None = None


def default_decode_chunk(device, num_views: int) -> int:
    """Views the VAE decodes at once by default: all views of an object on a GPU (one
    batched decode instead of V small ones), one at a time on the CPU (bounded memory)."""
    return 1 if torch.device(device).type == "cpu" else max(int(num_views), 1)


def rescale_noise_cfg(
    eps_cfg: torch.Tensor, eps_cond: torch.Tensor, guidance_rescale: float, num_views: int
) -> torch.Tensor:
    """CFG rescale (Lin et al. 2023, §3.4) with the statistics taken per object.

    The guided prediction is scaled so that its standard deviation over all views of an
    object matches the conditional prediction's, then blended with the unscaled one:
    ``phi * eps_cfg * std_cond / std_cfg + (1 - phi) * eps_cfg``.
    """
    b = eps_cfg.shape[0] // num_views
    flat_cfg = eps_cfg.reshape(b, -1)  # (B*V, C, h, w) -> (B, V*C*h*w)
    flat_cond = eps_cond.reshape(b, -1)  # (B*V, C, h, w) -> (B, V*C*h*w)
    factor = flat_cond.std(dim=1, keepdim=True) / flat_cfg.std(dim=1, keepdim=True)
    rescaled = (flat_cfg * factor).reshape(eps_cfg.shape)  # (B, V*C*h*w) -> (B*V, C, h, w)
    return guidance_rescale * rescaled + (1.0 - guidance_rescale) * eps_cfg


class MVDreamPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    """MVDream text-to-multi-view sampling with any diffusers scheduler.

    Components: ``unet`` (:class:`mvdiff.models.MultiViewUNet2DConditionModel`), ``vae``
    (``AutoencoderKL``), ``text_encoder`` (``CLIPTextModel``), ``tokenizer`` (``CLIPTokenizer``),
    ``scheduler`` (DDIM configured like the official sampler in converted folders; see
    :func:`mvdiff.pipelines.make_scheduler` for DPM-Solver++).

    ``save_pretrained`` / ``push_to_hub`` write a folder that carries this code
    (:mod:`mvdiff.pipelines.folders`); LoRA weights in diffusers' format load with
    ``load_lora_weights`` / ``fuse_lora``.
    """

    model_cpu_offload_seq = "text_encoder->image_encoder->unet->vae"
    # ImageDream folders (converted ``sd-v2.1-base-4view-ipmv``) add the OpenCLIP ViT-H
    # vision tower and its preprocessing; MVDream folders have neither.
    _optional_components = ["image_encoder", "feature_extractor"]
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        unet,
        vae,
        text_encoder,
        tokenizer,
        scheduler,
        image_encoder=None,
        feature_extractor=None,
    ):
        super().__init__()
        self.register_modules(
            unet=unet,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            scheduler=scheduler,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
        )
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae else 8

    # mvdiff-only: begin
    # (left out of the copy shipped in model folders, see mvdiff.pipelines.folders)

    @classmethod
    def load_config(cls, pretrained_model_name_or_path, *args, **kwargs):
        """diffusers' reader of ``model_index.json``, with the folder's shipped (or community)
        pipeline and UNet classes replaced by mvdiff's own."""
        out = super().load_config(pretrained_model_name_or_path, *args, **kwargs)
        folders.use_mvdiff_classes(out[0] if isinstance(out, tuple) else out)
        return out

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' ``from_pretrained`` with mvdiff's classes, for mvdiff folders (old and
        new), hub ids (a snapshot of configs, safetensors and code) and the community MVDream /
        ImageDream layout (its UNet converted on load)."""
        folder = folders.local_folder(pretrained_model_name_or_path, kwargs)
        if folders.is_community_folder(folder) and "unet" not in kwargs:
            dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
            kwargs["unet"] = folders.load_community_unet(folder, dtype)
        return super().from_pretrained(str(folder), **kwargs)

    def save_config(self, save_directory, push_to_hub: bool = False, **kwargs):
        """diffusers writes ``model_index.json`` here, last (before any upload); the folder's
        code is added to it (:func:`mvdiff.pipelines.folders.write_shipped_code`)."""
        super().save_config(save_directory, push_to_hub=push_to_hub, **kwargs)
        folders.write_shipped_code(save_directory, self)

    # mvdiff-only: end

    # ------------------------------------------------------------------ pieces

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> text embeddings ``[N, L, D]`` (the encoder's last hidden state)."""
        ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids  # (N, L)
        return self.text_encoder(ids.to(self._execution_device))[0]

    @property
    def has_camera_mlp(self) -> bool:
        return getattr(self.unet, "class_embedding", None) is not None

    def make_cameras(
        self,
        num_views: int,
        elevation: float,
        azimuth_start: float,
        azimuth_span: float,
        cameras: torch.Tensor | np.ndarray | None,
        batch_size: int,
    ) -> torch.Tensor | None:
        """Camera vectors ``[B*V, 16]`` (float32, CPU) for the batch, or None in 2D mode."""
        if cameras is None:
            if num_views == 1 or not self.has_camera_mlp:
                return None  # plain 2D, or a multi-view UNet trained without cameras
            cameras = get_camera(num_views, elevation, azimuth_start, azimuth_span)
        cameras = torch.as_tensor(cameras, dtype=torch.float32).cpu()
        if cameras.shape[0] == num_views:
            cameras = cameras.repeat(batch_size, 1)  # (V, 16) -> (B*V, 16)
        return cameras

    def check_inputs(
        self,
        prompt,
        negative_prompt,
        prompt_embeds,
        negative_prompt_embeds,
        num_views,
        azimuth_span,
        cameras,
        height,
        width,
        num_inference_steps,
        guidance_rescale,
        num_images_per_prompt,
        output_type,
        latents,
    ) -> list[str] | None:
        """Validate the arguments (one-line :class:`UserError` naming the argument); returns the
        prompts as a list (None when ``prompt_embeds`` are given)."""
        if prompt is not None and prompt_embeds is not None:
            raise UserError("give either prompt or prompt_embeds, not both")
        if prompt is None and prompt_embeds is None:
            raise UserError("prompt is required (or prompt_embeds)")
        prompts = None
        if prompt is not None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            if not prompts:
                raise UserError("prompt: empty list of prompts")
            if not all(isinstance(p, str) for p in prompts):
                raise UserError("prompt must be a string or a list of strings")
        n_prompts = len(prompts) if prompts is not None else prompt_embeds.shape[0]
        if isinstance(negative_prompt, (list, tuple)) and len(negative_prompt) != n_prompts:
            raise UserError(
                f"negative_prompt has {len(negative_prompt)} entries for {n_prompts} prompt(s)"
            )
        if negative_prompt_embeds is not None:
            if prompt_embeds is None or negative_prompt_embeds.shape != prompt_embeds.shape:
                raise UserError(
                    "negative_prompt_embeds must come with prompt_embeds of the same shape"
                )
        if not isinstance(num_views, int) or num_views < 1:
            raise UserError(f"num_views must be a positive integer, got {num_views!r}")
        if cameras is None and num_views > 1:
            if not 0 < azimuth_span <= 360:
                raise UserError(f"azimuth_span must be in (0, 360] degrees, got {azimuth_span}")
            if azimuth_span / num_views < 1.0:
                raise UserError(
                    f"num_views={num_views} over azimuth_span={azimuth_span} puts views less "
                    "than 1 degree apart; use fewer views or a wider span"
                )
        if cameras is not None:
            if not self.has_camera_mlp:
                raise UserError("cameras: this UNet has no camera MLP (class_embedding)")
            shape = tuple(torch.as_tensor(cameras).shape)
            rows = (num_views, n_prompts * num_images_per_prompt * num_views)
            if len(shape) != 2 or shape[1] != 16 or shape[0] not in rows:
                raise UserError(f"cameras must be [{num_views}, 16] or [B*V, 16], got {shape}")
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value <= 0 or value % self.vae_scale_factor:
                raise UserError(
                    f"{name} must be a positive multiple of {self.vae_scale_factor}, got {value!r}"
                )
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise UserError(f"num_inference_steps must be >= 1, got {num_inference_steps!r}")
        if not 0.0 <= guidance_rescale <= 1.0:
            raise UserError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise UserError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt!r}")
        if output_type not in OUTPUT_TYPES:
            raise UserError(f"output_type must be one of {list(OUTPUT_TYPES)}, got {output_type!r}")
        if latents is not None:
            b = n_prompts * num_images_per_prompt * num_views
            expected = (b, self.unet.config.in_channels, height // self.vae_scale_factor,
                        width // self.vae_scale_factor)  # fmt: skip
            if tuple(latents.shape) != expected:
                raise UserError(f"latents must be {list(expected)}, got {list(latents.shape)}")
        return prompts

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, chunk_size: int = 1) -> torch.Tensor:
        """Latents ``[N, 4, h, w]`` -> images ``[N, 3, H, W]`` float32 in [0, 1], decoding
        ``chunk_size`` views at a time to bound the VAE's activation memory."""
        scale = self.vae.config.scaling_factor
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        images = []
        for chunk in latents.split(chunk_size):
            z = chunk.to(dtype=self.vae.dtype) / scale + shift
            images.append(self.vae.decode(z).sample.float())
        return (torch.cat(images) / 2 + 0.5).clamp(0, 1)

    # Removed option, kept for one release so that setting it says so (next release: delete).
    @property
    def winograd_decode(self) -> bool:
        """Removed: the VAE always decodes with PyTorch's own convolutions (always False)."""
        return False

    @winograd_decode.setter
    def winograd_decode(self, value) -> None:
        warnings.warn(WINOGRAD_REMOVED, FutureWarning, stacklevel=2)

    @property
    def has_image_prompt(self) -> bool:
        return bool(getattr(self.unet.config, "num_image_tokens", 0))

    @staticmethod
    def composite_image(image, background: float | tuple | None, generator=None) -> PIL.Image.Image:
        """An input photo -> RGB PIL image. RGBA (or PIL with transparency) is composited over
        ``background`` (a grey level or RGB in [0, 1]; None draws a grey level from
        ``generator``, as the official demo's ``add_random_background``); RGB is taken as is
        (a plain background is the user's job, as for the official model)."""
        if isinstance(image, torch.Tensor):
            image = image.detach().cpu().float().numpy()
            if image.ndim == 3 and image.shape[0] in (3, 4):
                image = image.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8:
                image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
            image = PIL.Image.fromarray(image)
        if not isinstance(image, PIL.Image.Image):
            raise UserError(
                f"image must be a PIL image, array or tensor, got {type(image).__name__}"
            )
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255
            if background is None:
                background = float(torch.rand((), generator=generator))
            bg = np.broadcast_to(np.asarray(background, dtype=np.float32), (3,))
            alpha = rgba[..., 3:]
            rgb = rgba[..., :3] * alpha + bg * (1 - alpha)
            return PIL.Image.fromarray((rgb * 255).round().astype(np.uint8))
        return image.convert("RGB")

    @torch.no_grad()
    def encode_image(
        self, images: list[PIL.Image.Image], height: int, width: int, generator=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RGB images -> (image embeddings ``[N, T, E]``: the vision tower's penultimate hidden
        states after the official OpenCLIP preprocessing, reference latents ``[N, 4, h, w]``:
        the image resized to ``height x width`` (no aspect kept, as the official
        ``T.Resize((size, size))``), VAE-encoded (a posterior sample, as the official
        ``get_first_stage_encoding``) and scaled)."""
        if self.image_encoder is None or self.feature_extractor is None:
            raise UserError(
                "image: this model folder has no image_encoder/feature_extractor (not ImageDream)"
            )
        device = self._execution_device
        pixels = self.feature_extractor(images=images, return_tensors="pt").pixel_values
        pixels = pixels.to(device, self.image_encoder.dtype)
        hidden = self.image_encoder(pixels, output_hidden_states=True).hidden_states
        embeds = hidden[-2].float()  # (N, T, E), no post-layernorm
        arrays = [np.asarray(im.resize((width, height), PIL.Image.BICUBIC)) for im in images]
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1
        x = x.to(device, self.vae.dtype)  # (N, H, W, 3) -> (N, 3, H, W) in [-1, 1]
        dist = self.vae.encode(x).latent_dist
        latents = dist.sample(generator=generator).float()
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return embeds, (latents - shift) * self.vae.config.scaling_factor

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        num_views: int = 4,
        elevation: float = 15.0,
        azimuth_start: float = 0.0,
        azimuth_span: float = 360.0,
        cameras: torch.Tensor | np.ndarray | None = None,
        height: int = 256,
        width: int = 256,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        guidance_rescale: float = 0.0,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        prompt_suffix: str = DEFAULT_PROMPT_SUFFIX,
        output_type: str = "pil",
        return_dict: bool = True,
        decode_chunk_size: int | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: tuple[str, ...] = ("latents",),
        image=None,
        reference_frame: bool = True,
        image_background: float | tuple | None = None,
    ) -> MVDreamPipelineOutput | tuple:
        """Sample ``num_views`` views for each prompt (and each of ``num_images_per_prompt``).

        Args:
            prompt: text or list of texts (B prompts); ``prompt_suffix`` (default
                ``", 3d asset"``, as the official script) is appended to each.
            negative_prompt: text(s) for the unconditional half of classifier-free guidance
                (default ``""``, as the official script); no suffix is appended.
            num_views, elevation, azimuth_start, azimuth_span: the official camera ring
                (:func:`mvdiff.cameras.get_camera`); or ``cameras`` ``[V, 16]`` / ``[B*V, 16]``.
                ``num_views=1`` without ``cameras`` is plain 2D text-to-image.
            guidance_scale: CFG scale (no CFG at <= 1); ``guidance_rescale``: CFG rescale
                factor in [0, 1] (statistics per object, :func:`rescale_noise_cfg`).
            eta: DDIM eta (passed to schedulers whose ``step`` takes it).
            generator, latents: randomness; ``latents`` ``[B*V, 4, H/8, W/8]`` replaces the
                initial noise (multiplied by the scheduler's ``init_noise_sigma``).
            prompt_embeds, negative_prompt_embeds: precomputed text embeddings ``[B, L, D]``.
            output_type: ``"pil"`` | ``"np"`` | ``"pt"`` | ``"latent"``.
            decode_chunk_size: views decoded by the VAE at once (default: all views of an
                object on a GPU, one at a time on the CPU; 1 bounds memory).
            callback_on_step_end: ``fn(pipe, step, t, tensors) -> dict`` as in diffusers.
            image: ImageDream models only: the photo (PIL, ``[H, W, C]`` array or ``[C, H, W]``
                tensor in [0, 1]; RGBA composited over ``image_background``), or one per
                prompt. ``reference_frame`` (default True, the ``ipmv`` "pixel" mode) adds the
                photo as a fifth, zero-camera view; False uses the image tokens only.
        """
        prompts = self.check_inputs(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_views,
            azimuth_span, cameras, height, width, num_inference_steps, guidance_rescale,
            num_images_per_prompt, output_type, latents,
        )  # fmt: skip
        device = self._execution_device
        do_cfg = guidance_scale > 1.0
        V = num_views
        if image is not None:
            if not self.has_image_prompt:
                raise UserError("image: this UNet has no image prompt (not an ImageDream model)")
            if reference_frame and (num_views < 1 or not self.has_camera_mlp):
                raise UserError("image: the reference frame needs a multi-view UNet with cameras")
            n = len(prompts) if prompts is not None else prompt_embeds.shape[0]
            images_in = list(image) if isinstance(image, (list, tuple)) else [image] * n
            if len(images_in) != n:
                raise UserError(f"image: {len(images_in)} images for {n} prompt(s)")
            images_in = [self.composite_image(im, image_background, generator) for im in images_in]
            image_embeds, reference = self.encode_image(images_in, height, width, generator)
        # views the UNet sees per object: the V views, plus the reference frame
        F = V + 1 if image is not None and reference_frame else V

        # 1. Text: one embedding per prompt, repeated for its objects and their views.
        if prompt_embeds is None:
            prompt_embeds = self.encode_prompt([p + prompt_suffix for p in prompts])
        n_prompts = prompt_embeds.shape[0]
        B = n_prompts * num_images_per_prompt  # objects
        if do_cfg and negative_prompt_embeds is None:
            negatives = negative_prompt if negative_prompt is not None else ""
            negatives = [negatives] * n_prompts if isinstance(negatives, str) else list(negatives)
            negative_prompt_embeds = self.encode_prompt(negatives)

        def per_view(embeds):  # (P, L, D) -> (P*N*F, L, D), rows (prompt, object, view)
            return embeds.repeat_interleave(num_images_per_prompt * F, dim=0)

        text = per_view(prompt_embeds)  # (B*F, L, D)
        if do_cfg:
            text = torch.cat([per_view(negative_prompt_embeds), text])  # (2*B*F, L, D)
        text = text.to(device, self.unet.dtype)

        # 2. Cameras: the same ones on the unconditional and the conditional half; the
        # reference frame's is the zero vector (official get_camera(V, extra_view=True)).
        camera = self.make_cameras(V, elevation, azimuth_start, azimuth_span, cameras, B)
        unet_camera = None
        if camera is not None:
            unet_camera = camera
            if F > V:
                per_object = camera.reshape(B, V, -1)  # (B*V, 16) -> (B, V, 16)
                zero = per_object.new_zeros(B, F - V, per_object.shape[-1])
                # (B, V, 16) + (B, 1, 16) -> (B, F, 16) -> (B*F, 16)
                unet_camera = torch.cat([per_object, zero], dim=1).reshape(B * F, -1)
            unet_camera = torch.cat([unet_camera, unet_camera]) if do_cfg else unet_camera
            unet_camera = unet_camera.to(device)  # (2*B*F, 16)

        # 2b. Image prompt: per object; the unconditional half gets zeros (official uncond).
        image_kwargs = {}
        if image is not None:
            embeds = image_embeds.repeat_interleave(num_images_per_prompt, dim=0)  # (B, T, E)
            ref = reference.repeat_interleave(num_images_per_prompt, dim=0)  # (B, 4, h, w)
            if do_cfg:
                embeds = torch.cat([torch.zeros_like(embeds), embeds])  # (2B, T, E)
                ref = torch.cat([torch.zeros_like(ref), ref])  # (2B, 4, h, w)
            image_kwargs["image_embeds"] = embeds.to(device, self.unet.dtype)
            if F > V:
                image_kwargs["reference_latents"] = ref.to(device, self.unet.dtype)

        # 3. Timesteps and initial noise (float32; one noise draw per object and view).
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        h, w = height // self.vae_scale_factor, width // self.vae_scale_factor
        C = self.unet.config.in_channels
        if latents is None:
            latents = randn_tensor((B, V, C, h, w), generator=generator, device=device,
                                   dtype=torch.float32)  # fmt: skip
            latents = latents.reshape(B * V, C, h, w)  # (B, V, C, h, w) -> (B*V, C, h, w)
        latents = latents.to(device, torch.float32) * self.scheduler.init_noise_sigma
        if F > V:
            # the reference frame's latent is replaced inside the UNet at every step; zeros
            # keep the scheduler's arithmetic on it finite
            per_object = latents.reshape(B, V, C, h, w)  # (B*V, C, h, w) -> (B, V, C, h, w)
            zero = per_object.new_zeros(B, F - V, C, h, w)
            latents = torch.cat([per_object, zero], dim=1).reshape(B * F, C, h, w)

        step_params = inspect.signature(self.scheduler.step).parameters
        step_kwargs = {}
        if "eta" in step_params:
            step_kwargs["eta"] = eta
        if "generator" in step_params:
            step_kwargs["generator"] = generator

        # 4. Denoising loop.
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                model_in = torch.cat([latents, latents]) if do_cfg else latents  # (2*B*V, C, h, w)
                model_in = self.scheduler.scale_model_input(model_in, t)
                eps = self.unet(
                    model_in.to(self.unet.dtype),
                    t,
                    encoder_hidden_states=text,
                    camera=unet_camera,
                    num_views=F,
                    **image_kwargs,
                ).sample.float()
                if do_cfg:
                    eps_uncond, eps_cond = eps.chunk(2)  # (2*B*F, ...) -> 2 x (B*F, ...)
                    eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
                    if guidance_rescale > 0:
                        eps = rescale_noise_cfg(eps, eps_cond, guidance_rescale, F)
                latents = self.scheduler.step(eps, t, latents, **step_kwargs).prev_sample
                if callback_on_step_end is not None:
                    local = {"latents": latents, "text": text, "camera": unet_camera}
                    tensors = {k: local[k] for k in callback_on_step_end_tensor_inputs}
                    out = callback_on_step_end(self, i, t, tensors) or {}
                    latents = out.get("latents", latents)
                progress_bar.update()

        # 5. Drop the reference frame, decode (decode_chunk_size views at a time).
        if F > V:
            # (B*F, C, h, w) -> (B, F, C, h, w) -> (B, V, C, h, w) -> (B*V, C, h, w)
            latents = latents.reshape(B, F, C, h, w)[:, :V].reshape(B * V, C, h, w)
        if output_type == "latent":
            images = latents
        else:
            chunk = decode_chunk_size or default_decode_chunk(self.vae.device, num_views)
            images = self.decode_latents(latents, chunk)  # (B*V, 3, H, W) in [0, 1]
            if output_type == "np":
                images = images.permute(0, 2, 3, 1).cpu().numpy()  # (N, 3, H, W) -> (N, H, W, 3)
            elif output_type == "pil":
                arrays = (images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu().numpy()
                images = [PIL.Image.fromarray(a) for a in arrays]
        self.maybe_free_model_hooks()
        inputs = images_in if image is not None else None
        if not return_dict:
            return (images, camera)
        return MVDreamPipelineOutput(images=images, cameras=camera, input_images=inputs)
